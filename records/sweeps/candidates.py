# ruff: noqa
# The candidate models of round 4's sweeps (RESULTS.md), by the names their metrics.json carry. To rerun
# a sweep, append them to model.py, then train them by name:
#
#     cat records/sweeps/candidates.py >> model.py
#     python train.py --model CW28 --epochs 15 --rotate 10 --shift 2 --scale 0.1 --val 10000 --seeds 0-1
#
# Each builds, module for module, the class the sweep trained, so a seed gives the same initial weights.


class Candidate(nn.Module):
    """Full 3x3 convolutions (the first ``full`` widths) and separable ones at 28x28, separable ones at
    14x14 and at 7x7 (each followed by dropout there), global average pooling, a 1x1 head."""

    def __init__(self, at28, at14, at7, full=1, dropout=0.02):
        super().__init__()
        layers, width = [], 1
        for index, out in enumerate(at28):
            layers += conv_block(width, out) if index < full else separable_block(width, out)
            width = out
        layers.append(nn.MaxPool2d(2))
        for out in at14:
            layers += separable_block(width, out)
            width = out
        layers.append(nn.MaxPool2d(2))
        for out in at7:
            layers += [*separable_block(width, out), nn.Dropout(dropout)]
            width = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(width, 10, 1)

    def forward(self, x):
        x = self.classifier(self.pool(self.features(x)))
        return F.log_softmax(x.flatten(1), dim=1)


# Under 8,000 parameters: the runs nc-* trained round 3's NetCompact (then under that name).
class NetCompactR3(Candidate):
    def __init__(self):
        super().__init__((16, 16), (32, 32), (48, 48))


class CW28(Candidate):
    def __init__(self):
        super().__init__((16, 24), (32, 32), (40, 48))


class CD14(Candidate):
    def __init__(self):
        super().__init__((16, 24), (24, 32, 32), (32, 48))


class CM2(Candidate):  # the chosen one: NetCompact since round 4
    def __init__(self):
        super().__init__((16, 24), (32, 32, 32), (32, 40))


class CT(Candidate):
    def __init__(self):
        super().__init__((8, 16), (24, 32), (40, 48), full=2)


# Under 2,000 parameters.
class MA(Candidate):
    def __init__(self):
        super().__init__((8, 8), (12, 12, 12), (16, 16))


class MB(Candidate):
    def __init__(self):
        super().__init__((8, 8), (16, 16), (16, 16))


class MC(Candidate):  # the chosen one
    def __init__(self):
        super().__init__((10, 10), (12, 12, 12), (12, 16))


class MD(Candidate):
    def __init__(self):
        super().__init__((8, 10), (12, 12, 12, 12), (16,))


class ME(Candidate):
    def __init__(self):
        super().__init__((12, 12), (12, 12, 12), (12, 14))


class MF(Candidate):
    def __init__(self):
        super().__init__((10, 10), (12, 12, 12), (14, 16))
