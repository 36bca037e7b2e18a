"""Compact CNNs for MNIST. Imports nothing but torch: copy this file alone into any notebook.

The models map normalised images (N, 1, 28, 28) to log-probabilities (N, 10), so they train with
``F.nll_loss``. Pixels are normalised as ``(x / 255 - 0.1307) / 0.3081``.
"""

import torch
import torch.nn.functional as F
from torch import nn


class CompactCNN(nn.Module):
    """In: normalised images (N, 1, 28, 28), float. Out: log-probabilities (N, 10); ``.exp()`` gives the
    class probabilities, ``predict`` the digits.

    Stages of 3x3 conv-BN-ReLU separated by 2x2 max-pools, then global average pooling and a 1x1
    convolution to the 10 classes (the parameters of a linear layer, for rubrics that forbid one).

    ``stages`` lists the output channels of each stage's convolutions: the first stage runs at 28x28,
    the next at 14x14, the last at 7x7. Most parameters sit in the 7x7 stage, where a parameter
    costs 49 multiply-accumulates per image instead of 784 at full resolution. Dropout acts at 7x7
    only, where it is cheap. From stage ``separable_from`` on, convolutions are depthwise-separable
    (a 3x3 filter per channel, then a 1x1 across channels): about a ninth of the parameters of a full
    3x3. The first convolution always stays full, since a per-channel filter on the one input channel
    would be too weak. Channel counts are multiples of 8, and of 16 where the budget allows: the CPU's
    vectors hold 16 floats.
    """

    def __init__(self, stages, dropout=0.0, separable_from=None):
        super().__init__()
        layers, channels = [], 1
        for index, widths in enumerate(stages):
            if index:
                layers.append(nn.MaxPool2d(2))
            for width in widths:
                if separable_from is not None and index >= separable_from and channels > 1:
                    layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                               nn.Conv2d(channels, width, 1, bias=False)]
                else:
                    layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                if index == len(stages) - 1:
                    layers.append(nn.Dropout(dropout))
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(channels, 10, 1)

    def forward(self, x):
        check_images(x)
        x = self.pool(self.features(x))
        return F.log_softmax(self.classifier(x).flatten(1), dim=1)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, and more forgiving of what a user may hand it: the state dict of a weight
        average (an AveragedModel's, as checkpoint.pt keeps it) loads as the weights it averages; anything
        else that does not fit gets a one-line ValueError saying what it is and what to load instead of a
        list of every mismatched tensor."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected a state dict (a dict of tensors, as model.pt holds), got "
                             f"{type(state_dict).__name__}")
        if {"config", "model", "history"} <= state_dict.keys():
            raise ValueError("this is a training checkpoint (checkpoint.pt), not weights: load model.pt, or "
                             "the checkpoint's ['model'] entry")
        if "n_averaged" in state_dict and all(key.startswith("module.") for key in state_dict
                                              if key != "n_averaged"):
            state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()
                          if key != "n_averaged"}
        if foreign := [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]:
            what = type(state_dict[foreign[0]]).__name__
            raise ValueError(f"these are not weights: {foreign[0]!r} holds a {what}, where a state dict "
                             "holds tensors (load model.pt)")
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError:
            shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
            fits = [name for name, cls in find_models().items()
                    if {k: tuple(v.shape) for k, v in cls().state_dict().items()} == shapes]
            hint = (f"they are weights of {fits[0]}: load them into {fits[0]}()" if fits else
                    "load them into the model class they were trained with (metrics.json names it)")
            raise ValueError(f"these weights do not fit {type(self).__name__}: {hint}") from None

    @torch.inference_mode()
    def predict(self, images):
        """Predicted digits (an int64 tensor (N,)) for normalised images shaped (N, 1, 28, 28),
        (1, 28, 28) or (28, 28), in evaluation mode whatever the model's mode (which it keeps).

        Raises ValueError for images that would give an answer without meaning: NaN or infinite values,
        values far outside the normalised range (about -0.42 to 2.82), such as raw 0-255 pixels, and
        images with nothing below 0, such as pixels in [0, 1] never normalised.
        """
        check_images(images, batched=False)
        if not torch.isfinite(images).all():
            raise ValueError("images hold NaN or infinite values: check how they were made")
        low, high = torch.aminmax(images) if images.numel() else (0, 0)
        if low < -5 or high > 5:
            raise ValueError(f"images range from {low:g} to {high:g}, far outside normalised MNIST (about "
                             "-0.42 to 2.82): normalise 0-255 pixels with (x / 255 - 0.1307) / 0.3081")
        while images.dim() < 4:
            images = images.unsqueeze(0)
        # Normalised, an MNIST image's black background is -0.42; with no value below 0 an image holds
        # pixels in [0, 1] that were never normalised, and the answer would mean nothing.
        if images.numel() and (unnormalised := (images.flatten(1).amin(dim=1) >= 0).nonzero()).numel():
            raise ValueError(f"image {unnormalised[0].item()} has no value below 0, as pixels in [0, 1] "
                             "that were never normalised (normalised MNIST has its background at -0.42): "
                             "normalise them with (x - 0.1307) / 0.3081")
        was_training = self.training
        self.eval()
        try:
            weight = next(self.parameters())
            return self(images.to(weight.device, weight.dtype)).argmax(dim=1)
        finally:
            self.train(was_training)


def check_images(images, batched=True):
    """Raise TypeError or ValueError, saying what was expected, unless ``images`` is a float image
    tensor of the right shape."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images normalised with mean 0.1307 and std 0.3081, got "
                         f"dtype {images.dtype}: convert with (x.float() / 255 - 0.1307) / 0.3081")
    shapes = "(N, 1, 28, 28)" if batched else "(N, 1, 28, 28), (1, 28, 28) or (28, 28)"
    dims_ok = images.dim() == 4 if batched else 2 <= images.dim() <= 4
    if not dims_ok or images.shape[-2:] != (28, 28) or (images.dim() > 2 and images.shape[-3] != 1):
        raise ValueError(f"expected images shaped {shapes}, got {tuple(images.shape)}")


class Net(CompactCNN):
    """The default model, 19,130 parameters: 16 channels at 28x28, 16-16 at 14x14, 32-32 at 7x7.

    In: normalised images (N, 1, 28, 28). Out: log-probabilities (N, 10) (see CompactCNN)."""

    def __init__(self, dropout=0.05):
        super().__init__(stages=((16,), (16, 16), (32, 32)), dropout=dropout)


class NetCompact(CompactCNN):
    """The small model, under 8,000 parameters: a 3x3 convolution to 16 channels, then
    depthwise-separable convolutions (3x3 per channel, 1x1 across channels): 16 more at 28x28,
    32-32 at 14x14 and 48-48 at 7x7.

    In: normalised images (N, 1, 28, 28). Out: log-probabilities (N, 10) (see CompactCNN)."""

    def __init__(self, dropout=0.02):
        super().__init__(stages=((16, 16), (32, 32), (48, 48)), dropout=dropout, separable_from=0)


class NetTiny(CompactCNN):
    """Under 5,000 parameters: full 3x3 convolutions to 8 then 16 channels at 28x28, then
    depthwise-separable ones: 24-24 at 14x14 and 24-32 at 7x7. Full convolutions at 28x28 cost few
    parameters at these widths and mix channels spatially, which a per-channel filter cannot: they
    tested better than a separable 16-16 start (RESULTS.md), and ran faster on the CPU.

    In: normalised images (N, 1, 28, 28). Out: log-probabilities (N, 10) (see CompactCNN)."""

    def __init__(self, dropout=0.02):
        super().__init__(stages=((8, 16), (24, 24), (24, 32)), dropout=dropout, separable_from=1)


class NetMicro(CompactCNN):
    """Under 3,000 parameters: a full 3x3 convolution to 12 channels, then depthwise-separable ones (3x3
    per channel, 1x1 across): 12 more at 28x28, 16-16-16 at 14x14, 16-24 at 7x7. At this size, channels
    and depth where a separable convolution costs few parameters (28x28, 14x14) tested better than
    channels at 7x7 (RESULTS.md, the sweep).

    In: normalised images (N, 1, 28, 28). Out: log-probabilities (N, 10) (see CompactCNN)."""

    def __init__(self, dropout=0.02):
        super().__init__(stages=((12, 12), (16, 16, 16), (16, 24)), dropout=dropout, separable_from=0)


def find_models():
    """Every model of this file by name: each nn.Module class defined here that builds without arguments
    (so not CompactCNN, which needs its stages), in the order they are defined."""
    return {name: cls for name, cls in globals().items()
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == __name__
            and builds_without_arguments(cls)}


def builds_without_arguments(cls):
    init = cls.__init__
    positional = init.__code__.co_argcount - 1 - len(init.__defaults__ or ())
    keywords = init.__code__.co_kwonlyargcount - len(init.__kwdefaults__ or {})
    return positional == 0 and keywords == 0


def __getattr__(name):
    # model.MODELS is found when it is read, so that a class added anywhere in this file, even below
    # here, is trained, checked and described by name with no other edit.
    if name == "MODELS":
        return find_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
