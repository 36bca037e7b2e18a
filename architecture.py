"""What a model is: its architecture table (per layer: output shape, receptive field, jump, parameters,
multiply-accumulates) and the checks a course asks of it (parameter budget, BatchNorm, Dropout, global
average pooling, no fully connected layer, log-probabilities of shape (N, 10), a receptive field that
sees a whole digit).

    python architecture.py                  # the shipped models, each against its own budget
    python architecture.py MyNet --brief S7 # your model against the S7 brief's budget

    print(describe(Net()))                  # the table; describe(...).rows holds its figures
    print(check_model(Net(), budget=20_000))  # pass/fail table; check_model(...).passed is a bool

The table is found by running the model once: its layers (modules) in the order they run, and the
functional calls of its forward between them (F.max_pool2d, F.relu, x.view, x.mean, ...). The receptive
field follows the course formulas, layer after layer: n_out = floor((n_in + 2p - k) / s) + 1,
j_out = j_in * s, r_out = r_in + (k - 1) * j_in, with k widened to d * (k - 1) + 1 by a dilation d.
"""

import sys
from typing import ClassVar, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Functional calls of a forward that the table lists: those that change the field or the shape, and
# those the checks look for. Named as func.__name__ gives them.
WINDOWED = {"conv2d", "max_pool2d", "avg_pool2d"}
ADAPTIVE = {"adaptive_avg_pool2d", "adaptive_max_pool2d"}
RESHAPES = {"view", "reshape", "flatten"}
LISTED = WINDOWED | ADAPTIVE | RESHAPES | {"mean", "linear", "relu", "relu_", "dropout", "dropout2d",
                                           "batch_norm", "log_softmax", "softmax"}
# MNIST's digits are scaled to fit a 20x20 box, centred in the 28x28 image: a unit that sees 20x20
# pixels can see a whole digit.
DIGIT = 20


class Layer(NamedTuple):
    name: str
    kind: str  # the module's class, or the function called (F.max_pool2d, x.view)
    window: tuple | None  # (kernel, stride, padding, dilation), each (height, width); None: no window
    input: tuple | None  # the input shape without the batch
    output: tuple  # the output shape without the batch: (C, H, W), or (features,)
    receptive_field: tuple | None  # per axis; None once it cannot be followed
    jump: tuple | None
    params: int  # counted where a module first runs
    macs: int
    dropout: float = 0.0  # its probability, for dropout layers and calls


class Description(NamedTuple):
    model: str
    image: tuple
    rows: list
    params: int  # all of model.parameters()
    uncounted: list  # names of parameters that no listed layer holds (used functionally, or never run)
    lost: str | None  # why the receptive field could not be followed, if it could not
    problem: str | None  # what training would refuse in its output (output_problem); None: nothing

    @property
    def macs(self):
        return sum(row.macs for row in self.rows)

    @property
    def last_conv(self):
        """The last convolution wider than 1x1, as a Layer, or None."""
        return next((row for row in reversed(self.rows) if row.kind in ("Conv2d", "F.conv2d")
                     and max(row.window[0]) > 1), None)

    @staticmethod
    def label(row):
        """How a row is named in a sentence: its layer, or its function and where it is called."""
        return row.name if row.kind[0].isupper() else f"{row.kind} in {row.name}"

    @property
    def output_field(self):
        return self.rows[-1].receptive_field if self.rows else None

    @property
    def sees_image(self):
        return bool(self.output_field) and all(r >= n for r, n in zip(self.output_field, self.image[-2:]))

    @property
    def sees_digit(self):
        """Whether the last convolution wider than 1x1 sees a whole digit, and the output the whole image."""
        last = self.last_conv
        return bool(last and last.receptive_field) and min(last.receptive_field) >= DIGIT and self.sees_image

    def table(self, short=False):
        """The table as text; ``short`` keeps only the layers that change the field or hold weights
        (convolutions, poolings, linear layers), the columns and totals unchanged."""
        header = ("layer", "type", "k / s / p / d", "output", "RF", "jump", "params", "MACs")
        rows = [row for row in self.rows if not short or row.window is not None
                or row.kind in ("Linear", "F.linear")]
        lines = [header] + [(row.name, row.kind, " / ".join(map(pair_text, row.window or ())),
                             "x".join(map(str, row.output)),
                             pair_text(row.receptive_field),
                             pair_text(row.jump) if len(row.output) == 3 else "",  # flat: no jump
                             f"{row.params:,}", f"{row.macs:,}") for row in rows]
        lines.append(("total", "", "", "", "", "", f"{self.params:,}", f"{self.macs:,}"))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        text = ["  ".join(cell.ljust(width) if column < 4 else cell.rjust(width)
                          for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
                for line in lines]
        text.insert(1, "-" * len(text[0]))
        text.insert(-1, "-" * len(text[0]))
        notes = [self.verdict()]
        if self.uncounted:
            notes.append(f"in the total but in no layer listed: {', '.join(self.uncounted)} (parameters used "
                         "outside a module, or of a layer that never ran)")
        return "\n".join([f"{self.model}: input {'x'.join(map(str, self.image))}", *text, *notes])

    __str__ = table

    def verdict(self):
        """What the last convolution wider than 1x1 and the output see, in one line."""
        size = "x".join(map(str, self.image[-2:]))
        last = self.last_conv
        if last is None:
            return "no convolution wider than 1x1: no layer combines neighbouring pixels"
        if last.receptive_field is None or self.output_field is None:
            return f"the receptive field could not be followed: {self.lost}"
        seen, which = "x".join(map(str, last.receptive_field)), self.label(last)
        if min(last.receptive_field) >= DIGIT:
            text = f"the last convolution wider than 1x1 ({which}) sees {seen} pixels: a whole digit"
        else:
            text = (f"the last convolution wider than 1x1 ({which}) sees only {seen} pixels, less than a "
                    f"digit ({DIGIT}x{DIGIT}): add a convolution or a pooling before it")
        if self.sees_image:
            return f"{text}; the output sees the whole {size} image"
        return f"{text}; the output sees only {'x'.join(map(str, self.output_field))} of the {size} image"


def pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def pair_text(values):
    if values is None:
        return "?"
    return str(values[0]) if values[0] == values[1] else "x".join(map(str, values))


class ModelError(ValueError):
    """A model whose forward cannot run on MNIST images; the message says where."""


# ---------------------------------------------------------------------------------------------
# The table: one forward pass, recorded


class Call(NamedTuple):
    """One step of a forward pass: a module that ran, or a function called outside any module."""

    name: str
    module: nn.Module | None
    function: str | None  # for a call: how it was written (F.max_pool2d, x.view)
    arguments: dict  # for a call: its arguments by name, where the table needs them
    input_shape: tuple | None
    output_shape: tuple


class Recorder(TorchFunctionMode):
    """Records the modules without submodules as they run, and the calls of LISTED functions made
    outside them (in a forward), with their shapes."""

    # How the listed functions take their arguments after the input, in order.
    PARAMETERS: ClassVar = {"max_pool2d": ("kernel_size", "stride", "padding", "dilation"),
                            "avg_pool2d": ("kernel_size", "stride", "padding"),
                            "conv2d": ("weight", "bias", "stride", "padding", "dilation", "groups"),
                            "adaptive_avg_pool2d": ("output_size",), "adaptive_max_pool2d": ("output_size",),
                            "dropout": ("p",), "dropout2d": ("p",), "linear": ("weight",)}

    def __init__(self, model):
        super().__init__()
        self.calls, self.running = [], []
        self.handles = [handle for name, module in model.named_modules() for handle in (
            module.register_forward_pre_hook(lambda module, inputs, name=name: self.running.append(name)),
            module.register_forward_hook(
                lambda module, inputs, output, name=name: self.ran(name, module, inputs, output)))]
        self.leaves = {name for name, module in model.named_modules() if not list(module.children())}

    def ran(self, name, module, inputs, output):
        self.running.pop()
        if name in self.leaves:
            self.calls.append(Call(name, module, None, {}, shape_of(inputs[0] if inputs else None),
                                   shape_of(output)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in LISTED and (not self.running or self.running[-1] not in self.leaves) and args \
                and isinstance(args[0], torch.Tensor):
            owner = self.running[-1] if self.running else ""
            module = getattr(func, "__module__", None)  # None for a tensor's method
            written = "x." if module is None else "F." if hasattr(nn.functional, name) else "torch."
            arguments = {**dict(zip(self.PARAMETERS.get(name, ()), args[1:])), **kwargs}
            self.calls.append(Call(f"{owner}.forward" if owner else "forward", None, written + name,
                                   arguments, shape_of(args[0]), shape_of(output)))
        return output


def shape_of(value):
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


@torch.no_grad()
def describe(model, image=(1, 28, 28)):
    """The architecture table of ``model`` for input images of shape ``image``: its layers and functional
    calls in the order they run, found by running it once in evaluation mode on two images (a fixed draw),
    and what is wrong with its output, if anything. ModelError if the forward fails."""
    recorder = Recorder(model)
    was_training = model.training
    model.eval()
    x = images_for(model, torch.randn(2, *image, generator=torch.Generator().manual_seed(0)))
    try:
        with recorder:
            output = model(x)
    except Exception as error:  # noqa: BLE001 (any failure of a learner's forward, in one line)
        raise ModelError(f"{type(model).__name__}'s forward fails on a batch shaped {tuple(x.shape)} "
                         f"({type(error).__name__}: {' '.join(str(error).split())})") from None
    finally:
        model.train(was_training)
        for handle in recorder.handles:
            handle.remove()
    rows, seen, lost = follow(recorder.calls, tuple(image))
    held = {id(parameter) for module in seen for parameter in module.parameters(recurse=False)}
    uncounted = [name for name, parameter in model.named_parameters() if id(parameter) not in held]
    return Description(type(model).__name__, tuple(image), rows, sum(p.numel() for p in model.parameters()),
                       uncounted, lost, output_problem(output, len(x)))


def images_for(model, images):
    """``images`` on the device, and in the float type, of ``model``'s weights."""
    weight = next(model.parameters(), images)
    return images.to(weight.device, weight.dtype if weight.is_floating_point() else None)


def follow(calls, image):
    """The table's rows for the recorded ``calls``, the receptive field followed through them; with the
    modules that ran, and why the field was lost if it was."""
    rows, seen, lost = [], [], None
    field, jump, size = (1, 1), (1, 1), image[-2:]
    for call in calls:
        module, spatial_in = call.module, spatial(call.input_shape)
        if field is not None and spatial_in is not None and spatial_in != size:
            lost = (f"the image changed from {'x'.join(map(str, size))} to {'x'.join(map(str, spatial_in))} "
                    f"before {call.name}, outside any layer the table knows")
            field = jump = None
        window = window_of(call, spatial_in)
        if window is None and spatial_in is not None and spatial(call.output_shape) not in (None, spatial_in):
            if field is not None:
                lost = f"{call.name} ({call.function or type(module).__name__}) changes the size in a way " \
                       "the table cannot follow"
            field = jump = None
        if window is not None and field is not None:
            kernel, stride, _, dilation = window
            field = tuple(r + (d * (k - 1)) * j for r, k, d, j in zip(field, kernel, dilation, jump))
            jump = tuple(j * s for j, s in zip(jump, stride))
        elif spatial_in is not None and spatial(call.output_shape) is None and field is not None:
            # Flattened (x.view, nn.Flatten, x.mean over the image): what follows sees the whole map.
            field = tuple(r + (n - 1) * j for r, n, j in zip(field, spatial_in, jump))
            jump = None
        size = spatial(call.output_shape)
        again = module is not None and module in seen
        params = 0 if module is None or again else sum(p.numel() for p in module.parameters(recurse=False))
        if module is not None and not again:
            seen.append(module)
        kind = call.function or type(module).__name__
        rows.append(Layer(call.name + (" (again)" if again else ""), kind, window,
                          call.input_shape and tuple(call.input_shape[1:]), tuple(call.output_shape[1:]),
                          field, jump, params, macs_of(call), dropout_of(call)))
    return rows, seen, lost


def spatial(shape):
    return tuple(shape[-2:]) if shape is not None and len(shape) == 4 else None


def window_of(call, spatial_in):
    """(kernel, stride, padding, dilation) of a windowed layer or call; for a global or adaptive
    pooling, the window it amounts to; None for the rest."""
    module, arguments = call.module, call.arguments
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return tuple(pair(getattr(module, key, 1)) for key in ("kernel_size", "stride", "padding",
                                                                "dilation"))
    name = (call.function or "").rpartition(".")[2]
    if name == "conv2d":
        kernel = tuple(arguments["weight"].shape[-2:])
        return (kernel, *(pair(arguments.get(key) or default) for key, default in
                          (("stride", 1), ("padding", 0), ("dilation", 1))))
    if name in ("max_pool2d", "avg_pool2d"):
        kernel = pair(arguments["kernel_size"])
        return (kernel, pair(arguments.get("stride") or kernel), pair(arguments.get("padding", 0)),
                pair(arguments.get("dilation", 1)))
    if spatial_in is None:
        return None
    out = spatial(call.output_shape)
    averages = name == "mean" and out is None and call.output_shape[:2] == call.input_shape[:2]
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or name in ADAPTIVE or averages:
        out = out or (1, 1)
        if all(n % o == 0 for n, o in zip(spatial_in, out)):  # even windows: a plain pooling
            stride = tuple(n // o for n, o in zip(spatial_in, out))
            return stride, stride, (0, 0), (1, 1)
    return None


def macs_of(call):
    """Multiply-accumulates of one image through a convolution or linear layer (the rest is elementwise
    work that costs little by comparison)."""
    module, output = call.module, call.output_shape
    weight = getattr(module, "weight", None) if module is not None else call.arguments.get("weight")
    if isinstance(module, nn.Conv2d) or call.function == "F.conv2d":
        return torch.Size(output[1:]).numel() * weight[0].numel()
    if isinstance(module, nn.Linear) or (call.function or "").endswith("linear"):
        return weight.numel() * torch.Size(output[1:-1]).numel()
    return 0


def dropout_of(call):
    if isinstance(call.module, DROPOUTS):
        return call.module.p
    if (call.function or "").rpartition(".")[2] in ("dropout", "dropout2d"):
        return call.arguments.get("p", 0.5)
    return 0.0


# ---------------------------------------------------------------------------------------------
# The checks a course asks of a model


class Checks(NamedTuple):
    rows: list  # (check, passed, what was found)
    description: Description

    @property
    def passed(self):
        return all(passed for _, passed, _ in self.rows)

    def __str__(self):
        width = max(len(check) for check, _, _ in self.rows)
        lines = [f"{'PASS' if passed else 'FAIL'}  {check.ljust(width)}  {found}"
                 for check, passed, found in self.rows]
        verdict = "all checks pass" if self.passed else "some checks FAIL"
        return "\n".join([f"{self.description.model}: {verdict}", *lines])


def output_problem(output, count):
    """None if ``output`` is what training needs of a model's output for ``count`` images (log-probabilities
    of shape (count, 10)); else what is wrong and what to do."""
    if not isinstance(output, torch.Tensor):
        return f"returns a {type(output).__name__}, not a tensor: return the log-probabilities only"
    shape = tuple(output.shape)
    if shape != (count, 10):
        if output.numel() == count * 10:
            return (f"returns shape {shape} for {count} images, not ({count}, 10): reshape with "
                    "x.view(-1, 10) or x.flatten(1) before the log_softmax")
        return f"returns shape {shape} for {count} images: its last layer must give 10 outputs, one per digit"
    if not output.is_floating_point() or not torch.isfinite(output).all():
        return "returns NaN, infinite or non-float values on ordinary images: check its forward"
    sums = output.float().exp().sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        if (output >= 0).all() and torch.allclose(output.float().sum(dim=1), torch.ones_like(sums),
                                                  atol=1e-3):
            what = "probabilities (softmax)"
        else:
            what = f"scores (logits: exp of a row sums to {sums[0].item():.3g}, not 1)"
        return f"returns {what}, not log-probabilities: end its forward with F.log_softmax(x, dim=1)"
    return None


def check_model(model, budget, allow_linear=False, image=(1, 28, 28)):
    """The checks of ``model`` against a parameter ``budget``, as Checks: print it for a pass/fail table,
    read ``.passed`` for one boolean. ``allow_linear`` for courses that allow a fully connected layer.
    ModelError if the forward fails."""
    description = describe(model, image)
    rows = description.rows
    batchnorms = [row.name for row in rows if row.kind.startswith("BatchNorm")
                  or row.kind.endswith("batch_norm")]
    dropouts = [row.dropout for row in rows if row.dropout > 0]
    linear = [row.name for row in rows if row.kind in ("Linear", "F.linear")]
    gap = [row.name for row in rows if is_global_average(row)]
    last, output = description.last_conv, description.output_field
    seen = (f"{description.label(last)} sees {'x'.join(map(str, last.receptive_field))}, the output "
            + ("the whole image" if description.sees_image else "only " + "x".join(map(str, output)))
            if last and last.receptive_field and output else description.verdict())
    checks = [
        (f"parameters < {budget:,}", description.params < budget, f"{description.params:,}"),
        ("BatchNorm", bool(batchnorms), f"{len(batchnorms)} layer(s)"),
        ("Dropout", bool(dropouts), f"{len(dropouts)} layer(s), p = {', '.join(f'{p:g}' for p in dropouts)}"
         if dropouts else "none with p > 0"),
        ("global average pooling", bool(gap), ", ".join(gap) or "no average over the whole image"),
        ("fully connected layer allowed" if allow_linear else "no fully connected layer",
         allow_linear or not linear, ", ".join(linear) or "none"),
        ("output (N, 10) of log-probabilities", description.problem is None, description.problem or "yes"),
        (f"receptive field: a digit ({DIGIT}x{DIGIT}), then the image", description.sees_digit, seen),
    ]
    return Checks(checks, description)


def is_global_average(row):
    """Whether ``row`` averages a whole map of more than one pixel down to one value per channel."""
    averaging = row.kind in ("AdaptiveAvgPool2d", "AvgPool2d") or row.kind.endswith(("avg_pool2d", ".mean"))
    return averaging and row.input is not None and len(row.input) == 3 and row.input[1:] != (1, 1) and (
        len(row.output) == 1 or row.output[1:] == (1, 1)) and row.output[0] == row.input[0]


def main(argv=None):
    import argparse

    from config import BRIEFS, BUDGETS, ConfigError, budget_of, build_model, model_names

    parser = argparse.ArgumentParser(description="The architecture table and the model checks of models in "
                                                 "model.py (the shipped ones by default).")
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model names (default: the shipped ones)")
    parser.add_argument("--brief", choices=list(BRIEFS),
                        help="the course brief whose parameter budget the models are held to (default: a "
                        "shipped model's own, S6's for the others)")
    parser.add_argument("--budget", type=int, help="a parameter budget for every model named instead")
    parser.add_argument("--allow-linear", action="store_true", help="allow fully connected layers")
    parser.add_argument("--short", action="store_true",
                        help="only the layers that change the receptive field or hold weights (the "
                        "parameters of the rest still count in the total)")
    args = parser.parse_args(argv)
    passed = True
    try:
        for name in args.models or [name for name in model_names() if name in BUDGETS]:
            try:
                checks = check_model(build_model(name), args.budget or budget_of(name, args.brief),
                                     args.allow_linear)
            except ModelError as error:
                print(f"error: {error}", file=sys.stderr)
                passed = False
                continue
            print(f"{checks.description.table(short=args.short)}\n\n{checks}\n")
            passed &= checks.passed
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    if not args.models and (others := [name for name in model_names() if name not in BUDGETS]):
        print(f"also in model.py: {', '.join(others)} (python architecture.py {others[0]} checks it)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
