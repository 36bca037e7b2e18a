"""What a model is: its architecture table (per layer: output shape, receptive field, jump, parameters,
multiply-accumulates) and the checks a course asks of it (parameter budget, BatchNorm, Dropout, global
average pooling, no fully connected layer, log-probabilities of shape (N, 10), a receptive field that
covers the image). Imports nothing but torch and model.py: copy it beside model.py.

    python architecture.py                  # every model of model.py: its table and its checks
    python architecture.py NetTiny --budget 5000

    print(describe(Net()))                  # the table; describe(...).rows holds its figures
    print(check_model(Net(), budget=20_000))  # pass/fail table; check_model(...).passed is a bool

The receptive field follows the course formulas, layer after layer: n_out = floor((n_in + 2p - k) / s) + 1,
j_out = j_in * s, r_out = r_in + (k - 1) * j_in, with k widened to d * (k - 1) + 1 by a dilation d. They
hold for models whose layers run one after another, as every model here does.
"""

import sys
from typing import NamedTuple

import torch
from torch import nn

# Layers that change the spatial size, with how (kernel, stride, padding, dilation) are read off them.
WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Layer(NamedTuple):
    name: str
    kind: str
    window: tuple | None  # (kernel, stride, padding, dilation), each (height, width); None: elementwise
    output: tuple  # the output shape without the batch: (C, H, W), or (features,)
    receptive_field: tuple | None  # per axis; None once it cannot be followed
    jump: tuple | None
    params: int
    macs: int


class Description(NamedTuple):
    model: str
    image: tuple
    rows: list
    last_conv: Layer | None  # the last convolution with a kernel wider than 1

    @property
    def params(self):
        return sum(row.params for row in self.rows)

    @property
    def macs(self):
        return sum(row.macs for row in self.rows)

    @property
    def covers_image(self):
        field = self.last_conv and self.last_conv.receptive_field
        return bool(field) and all(r >= n for r, n in zip(field, self.image[-2:]))

    def __str__(self):
        return self.table()

    def table(self, brief=False):
        """The table as text; ``brief`` keeps only the layers that change the field or hold weights
        (convolutions, poolings, linear layers), the columns and totals unchanged."""
        header = ("layer", "type", "k / s / p / d", "output", "RF", "jump", "params", "MACs")
        rows = [row for row in self.rows if not brief or row.window is not None or row.kind == "Linear"]
        lines = [header] + [(row.name, row.kind, window_text(row.window), "x".join(map(str, row.output)),
                             pair_text(row.receptive_field), pair_text(row.jump), f"{row.params:,}",
                             f"{row.macs:,}") for row in rows]
        lines.append(("total", "", "", "", "", "", f"{self.params:,}", f"{self.macs:,}"))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        text = ["  ".join(cell.ljust(width) if column < 4 else cell.rjust(width)
                          for column, (cell, width) in enumerate(zip(line, widths))).rstrip()
                for line in lines]
        text.insert(1, "-" * len(text[0]))
        text.insert(-1, "-" * len(text[0]))
        return "\n".join([f"{self.model}: input {'x'.join(map(str, self.image))}", *text, self.verdict()])

    def verdict(self):
        size = "x".join(map(str, self.image[-2:]))
        if self.last_conv is None:
            return "no convolution wider than 1x1: nothing sees more than one pixel"
        if self.last_conv.receptive_field is None:
            return f"the receptive field of {self.last_conv.name} could not be followed (see the table)"
        seen = "x".join(map(str, self.last_conv.receptive_field))
        if self.covers_image:
            return f"the last convolution wider than 1x1 ({self.last_conv.name}) sees {seen} pixels: the " \
                   f"whole {size} image"
        return f"the last convolution wider than 1x1 ({self.last_conv.name}) sees only {seen} pixels, less " \
               f"than the {size} image: add a convolution or a pooling before it to see the whole digit"


def pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def pair_text(values):
    if values is None:
        return "?"
    return str(values[0]) if values[0] == values[1] else "x".join(map(str, values))


def window_text(window):
    if window is None:
        return ""
    return " / ".join(pair_text(values) for values in window)


@torch.no_grad()
def describe(model, image=(1, 28, 28)):
    """The architecture table of ``model`` (any nn.Module whose layers run one after another) for one
    input image of shape ``image``: its layers in the order they run, found by running it once."""
    leaves = [(name, module) for name, module in model.named_modules() if not list(module.children())]
    shapes = []

    def record(module, inputs, output, name):
        shapes.append((name, module, inputs[0].shape, output.shape))

    hooks = [module.register_forward_hook(lambda *args, name=name: record(*args, name))
             for name, module in leaves]
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
        model(torch.zeros(1, *image, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    rows, field, jump, size = [], (1, 1), (1, 1), tuple(image[-2:])
    last_conv = None
    for name, module, input_shape, output_shape in shapes:
        window = None
        spatial_in = tuple(input_shape[-2:]) if len(input_shape) == 4 else None
        if field is not None and spatial_in != size:
            field = jump = None  # the size changed between layers, outside any layer: cannot follow
        if isinstance(module, WINDOWED):
            window = tuple(pair(getattr(module, key, 1)) for key in ("kernel_size", "stride", "padding",
                                                                      "dilation"))
        elif isinstance(module, ADAPTIVE) and spatial_in is not None:
            out = tuple(output_shape[-2:])
            if all(n % o == 0 for n, o in zip(spatial_in, out)):  # even windows: a plain pooling
                stride = tuple(n // o for n, o in zip(spatial_in, out))
                window = (stride, stride, (0, 0), (1, 1))
            else:
                field = jump = None
        if window is not None and field is not None:
            kernel, stride, _, dilation = window
            field = tuple(r + (d * (k - 1)) * j for r, k, d, j in zip(field, kernel, dilation, jump))
            jump = tuple(j * s for j, s in zip(jump, stride))
        size = tuple(output_shape[-2:]) if len(output_shape) == 4 else None
        row = Layer(name, type(module).__name__, window, tuple(output_shape[1:]), field, jump,
                    sum(p.numel() for p in module.parameters(recurse=False)), macs(module, output_shape))
        rows.append(row)
        if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
            last_conv = row
    return Description(type(model).__name__, tuple(image), rows, last_conv)


def macs(module, output_shape):
    """Multiply-accumulates of one image through ``module``: convolutions and linear layers (the rest is
    elementwise work that costs little by comparison)."""
    if isinstance(module, nn.Conv2d):
        return output_shape[1:].numel() * module.in_channels // module.groups * module.kernel_size[0] \
            * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


# ---------------------------------------------------------------------------------------------
# The checks a course asks of a model


class Checks(NamedTuple):
    model: str
    rows: list  # (check, passed, what was found)

    @property
    def passed(self):
        return all(passed for _, passed, _ in self.rows)

    def __str__(self):
        width = max(len(check) for check, _, _ in self.rows)
        lines = [f"{'PASS' if passed else 'FAIL'}  {check.ljust(width)}  {found}"
                 for check, passed, found in self.rows]
        verdict = "all checks pass" if self.passed else "some checks FAIL"
        return "\n".join([f"{self.model}: {verdict}", *lines])


def check_model(model, budget=20_000, allow_linear=False, image=(1, 28, 28)):
    """The checks of ``model`` against a parameter ``budget``, as Checks: print it for a pass/fail table,
    read ``.passed`` for one boolean. ``allow_linear`` for courses that allow a fully connected layer."""
    description = describe(model, image)
    modules = list(model.modules())
    dropouts = [m.p for m in modules if isinstance(m, DROPOUTS) and m.p > 0]
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    gap = [row.name for row in description.rows
           if row.kind in ("AdaptiveAvgPool2d", "AvgPool2d") and row.output[-2:] == (1, 1)]
    batch = torch.randn(2, *image, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(batch)
    finally:
        model.train(was_training)
    shape_ok = tuple(output.shape) == (2, 10)
    log_probs = shape_ok and bool((output <= 1e-6).all()) and torch.allclose(
        output.exp().sum(dim=1), torch.ones(2, device=output.device), atol=1e-4)
    rows = [
        (f"parameters < {budget:,}", description.params < budget, f"{description.params:,}"),
        ("BatchNorm", any(isinstance(m, BATCHNORMS) for m in modules),
         f"{sum(isinstance(m, BATCHNORMS) for m in modules)} layer(s)"),
        ("Dropout", bool(dropouts), f"{len(dropouts)} layer(s), p = {', '.join(f'{p:g}' for p in dropouts)}"
         if dropouts else "none with p > 0"),
        ("global average pooling", bool(gap), ", ".join(gap) or "no average pooling down to 1x1"),
        ("fully connected layer allowed" if allow_linear else "no fully connected layer",
         allow_linear or not linear, ", ".join(linear) or "none"),
        ("output (N, 10) of log-probabilities", bool(log_probs),
         f"shape {tuple(output.shape)}" + ("" if not shape_ok else ", rows are log-probabilities" if log_probs
                                           else ", rows are not log-probabilities (log_softmax?)")),
        ("receptive field covers the image", description.covers_image, field_text(description)),
    ]
    return Checks(type(model).__name__, rows)


def field_text(description):
    last = description.last_conv
    if last is None or last.receptive_field is None:
        return description.verdict()
    return (f"{'x'.join(map(str, last.receptive_field))} pixels seen by {last.name}, of a "
            f"{'x'.join(map(str, description.image[-2:]))} image")


def main(argv=None):
    import argparse

    from model import MODELS

    parser = argparse.ArgumentParser(description="The architecture table and the model checks of models "
                                                 "in model.py (all of them by default).")
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"model names: {', '.join(MODELS)}")
    parser.add_argument("--budget", type=int, default=20_000, help="parameter budget (default: 20000)")
    parser.add_argument("--allow-linear", action="store_true", help="allow fully connected layers")
    parser.add_argument("--brief", action="store_true",
                        help="only the layers that change the receptive field or hold weights (not BatchNorm "
                        "and activations, whose parameters count in the total)")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.models if name not in MODELS]:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    passed = True
    for name in args.models or MODELS:
        model = MODELS[name]()
        checks = check_model(model, args.budget, args.allow_linear)
        print(f"{describe(model).table(brief=args.brief)}\n\n{checks}\n")
        passed &= checks.passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
