"""Compact CNNs for MNIST, drawn as the course draws them: 3x3 convolutions with BatchNorm and ReLU,
max-pools, dropout, global average pooling, then a 1x1 convolution to the 10 classes.

In: normalised images (N, 1, 28, 28), pixels as (x / 255 - 0.1307) / 0.3081. Out: log-probabilities
(N, 10), for F.nll_loss. Imports nothing but torch: copy this file alone into any notebook. Your own
model is a class added to this file: `python train.py --model YourNet` trains it (see the README).
"""

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(in_channels, out_channels):
    """A 3x3 convolution, BatchNorm, ReLU. No bias in the convolution: the BatchNorm after it adds one."""
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def separable_block(in_channels, out_channels):
    """A depthwise-separable convolution (a 3x3 filter per channel, then a 1x1 across channels: about a
    ninth of the parameters of a full 3x3), BatchNorm, ReLU."""
    return [nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class Net(nn.Module):
    """The default model, 19,130 parameters. Most of them sit at 7x7, where a parameter costs 49
    multiply-accumulates per image instead of 784 at 28x28; dropout acts there too."""

    def __init__(self, dropout=0.05):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 16),                                # 28x28, receptive field 3
            nn.MaxPool2d(2),                                   # 14x14, 4
            *conv_block(16, 16), *conv_block(16, 16),          # 8, 12
            nn.MaxPool2d(2),                                   # 7x7, 14
            *conv_block(16, 32), nn.Dropout(dropout),          # 22
            *conv_block(32, 32), nn.Dropout(dropout),          # 30: the whole image
        )
        self.pool = nn.AdaptiveAvgPool2d(1)                    # global average pooling: 32x1x1
        self.classifier = nn.Conv2d(32, 10, 1)                 # a linear layer's parameters, as a 1x1 conv

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


class NetCompact(nn.Module):
    """Under 8,000 parameters (7,986), for the S7 brief: a full 3x3 convolution to 16 channels (a
    per-channel filter on the one input channel would be too weak), then depthwise-separable ones, with
    width at 28x28 and depth at 14x14, where they cost few parameters (chosen on held-out images over a
    NetCompact of 16-16, 32-32, 48-48: RESULTS.md)."""

    def __init__(self, dropout=0.02):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 16), *separable_block(16, 24),      # 28x28, receptive field 3, 5
            nn.MaxPool2d(2),                                   # 14x14, 6
            *separable_block(24, 32), *separable_block(32, 32), *separable_block(32, 32),  # 10, 14, 18
            nn.MaxPool2d(2),                                   # 7x7, 20
            *separable_block(32, 32), nn.Dropout(dropout),     # 28
            *separable_block(32, 40), nn.Dropout(dropout),     # 36
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(40, 10, 1)

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


class NetTiny(nn.Module):
    """Under 5,000 parameters (4,906). Full convolutions at 28x28 cost few parameters at these widths and
    mix channels spatially, which a per-channel filter cannot: they tested better than a separable start
    (RESULTS.md), and ran faster on the CPU."""

    def __init__(self, dropout=0.02):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 8), *conv_block(8, 16),             # 28x28
            nn.MaxPool2d(2),
            *separable_block(16, 24), *separable_block(24, 24),  # 14x14
            nn.MaxPool2d(2),
            *separable_block(24, 24), nn.Dropout(dropout),     # 7x7
            *separable_block(24, 32), nn.Dropout(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


class NetMicro(nn.Module):
    """Under 3,000 parameters (2,862). At this size, channels and depth where a separable convolution is
    cheap (28x28, 14x14) tested better than channels at 7x7 (RESULTS.md, the sweep)."""

    def __init__(self, dropout=0.02):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 12), *separable_block(12, 12),      # 28x28
            nn.MaxPool2d(2),
            *separable_block(12, 16), *separable_block(16, 16), *separable_block(16, 16),  # 14x14
            nn.MaxPool2d(2),
            *separable_block(16, 16), nn.Dropout(dropout),     # 7x7
            *separable_block(16, 24), nn.Dropout(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(24, 10, 1)

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


class NetNano(nn.Module):
    """Under 2,000 parameters (1,884): NetMicro's layout, narrower. Of six widths trained on held-out
    images, this one, with a third convolution at 14x14, did best (RESULTS.md, under 2,000)."""

    def __init__(self, dropout=0.02):
        super().__init__()
        self.features = nn.Sequential(
            *conv_block(1, 10), *separable_block(10, 10),      # 28x28
            nn.MaxPool2d(2),
            *separable_block(10, 12), *separable_block(12, 12), *separable_block(12, 12),  # 14x14
            nn.MaxPool2d(2),
            *separable_block(12, 12), nn.Dropout(dropout),     # 7x7
            *separable_block(12, 16), nn.Dropout(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


# ---------------------------------------------------------------------------------------------
# Using a trained model


@torch.inference_mode()
def predict(model, images):
    """The digits (int64, shape (N,)) that ``model`` predicts for normalised images shaped (N, 1, 28, 28),
    (1, 28, 28) or (28, 28), in evaluation mode whatever the model's mode (which it keeps).

    Raises TypeError or ValueError for images that would give an answer without meaning: not a float
    tensor of that shape, NaN or infinite values, or evidently never normalised (every value inside
    [0, 1], as pixels / 255 are; or far outside the normalised range of about -0.42 to 2.82, as 0-255
    pixels are). A normalised digit on grey paper (background above 0) is fine.
    """
    check_images(images)
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values: check how they were made")
    while images.dim() < 4:
        images = images.unsqueeze(0)
    if len(images):
        low, high = images.flatten(1).aminmax(dim=1)
        if (far := ((low < -5) | (high > 5)).nonzero()).numel():
            index = far[0].item()
            raise ValueError(f"image {index} ranges from {low[index]:g} to {high[index]:g}, far outside "
                             "normalised MNIST (about -0.42 to 2.82): normalise 0-255 pixels with "
                             "(x / 255 - 0.1307) / 0.3081")
        if (unit := ((low >= 0) & (high <= 1)).nonzero()).numel():
            raise ValueError(f"image {unit[0].item()} has every value inside [0, 1], as pixels that were "
                             "never normalised (normalised MNIST ink reaches 2.82): normalise them with "
                             "(x - 0.1307) / 0.3081")
    was_training = model.training
    model.eval()
    try:
        weight = next(model.parameters())
        return model(images.to(weight.device, weight.dtype)).argmax(dim=1)
    finally:
        model.train(was_training)


def check_images(images):
    """TypeError or ValueError, saying what was expected, unless ``images`` is a float tensor shaped
    (N, 1, 28, 28), (1, 28, 28) or (28, 28)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images normalised with mean 0.1307 and std 0.3081, got "
                        f"dtype {images.dtype}: convert with (x.float() / 255 - 0.1307) / 0.3081")
    if not 2 <= images.dim() <= 4 or images.shape[-2:] != (28, 28) or (images.dim() > 2 and
                                                                       images.shape[-3] != 1):
        raise ValueError(f"expected images shaped (N, 1, 28, 28), (1, 28, 28) or (28, 28), got "
                         f"{tuple(images.shape)}")
