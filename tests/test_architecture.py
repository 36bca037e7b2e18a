"""The architecture table and the model checks, against independent measurements."""

import ast
import copy
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from architecture import check_model, describe
from conftest import DATA_DIR, ROOT
from model import MODELS, Net


def gradient_field(layers, size=96):
    """The receptive field of the centre unit of ``layers``' output, measured: the extent of the input
    pixels whose gradient is not zero. Max-pools become average pools and ReLUs identities (the same
    windows), so that every pixel in the field passes gradient."""
    layers = copy.deepcopy(layers).eval()
    for name, module in list(layers.named_modules()):
        parent = layers.get_submodule(name.rpartition(".")[0]) if "." in name else layers
        if isinstance(module, nn.MaxPool2d):
            average = nn.AvgPool2d(module.kernel_size, module.stride, module.padding)
            setattr(parent, name.rpartition(".")[2], average)
        elif isinstance(module, nn.ReLU):
            setattr(parent, name.rpartition(".")[2], nn.Identity())
    torch.manual_seed(0)
    x = torch.randn(1, layers[0].in_channels, size, size, requires_grad=True)
    out = layers(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows, columns = (x.grad[0].abs().sum(dim=0) > 0).nonzero().unbind(1)
    return (rows.max() - rows.min() + 1).item(), (columns.max() - columns.min() + 1).item()


def up_to_last_conv(model):
    """model.features up to its last convolution wider than 1x1."""
    name = describe(model).last_conv.name
    index = int(name.rpartition(".")[2])
    return nn.Sequential(*list(model.features)[:index + 1])


def test_nets_last_3x3_convolution_sees_30x30_pixels():
    description = describe(Net())
    assert description.last_conv.name == "features.15" and description.last_conv.receptive_field == (30, 30)
    assert description.covers_image
    assert "sees 30x30 pixels: the whole 28x28 image" in str(description)


@pytest.mark.parametrize("name", MODELS)
def test_the_receptive_field_of_every_model_is_what_its_gradient_reaches(name):
    model = MODELS[name]()
    assert describe(model).last_conv.receptive_field == gradient_field(up_to_last_conv(model))


STACKS = {
    "stride, padding, dilation": [nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4),
                                  nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 3)],
    "groups and a wide kernel": [nn.Conv2d(1, 8, 3, padding=1), nn.AvgPool2d(2),
                                 nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1),
                                 nn.Conv2d(8, 8, (3, 5), padding=(1, 2)), nn.Dropout(0.1)],
    "large stride": [nn.Conv2d(1, 8, 7, stride=3), nn.Conv2d(8, 8, 3, stride=2, padding=1, dilation=3)],
}


@pytest.mark.parametrize("name", STACKS)
def test_hand_made_stacks_match_their_gradient_and_their_output_shapes(name):
    layers = nn.Sequential(*STACKS[name])
    description = describe(layers)
    assert description.last_conv.receptive_field == gradient_field(layers)
    # The shapes follow n_out = floor((n_in + 2p - d(k - 1) - 1) / s) + 1 through the stack.
    shape = (1, 28, 28)
    for row, module in zip(description.rows, layers):
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = row.window
            shape = (row.output[0], (shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                     (shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        assert row.output == shape, row
    assert row.output == tuple(layers(torch.zeros(1, 1, 28, 28)).shape[1:])


@pytest.mark.parametrize("name", MODELS)
def test_parameters_and_multiply_accumulates_add_up(name):
    model = MODELS[name]()
    description = describe(model)
    assert description.params == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 1, 28, 28))
    assert description.macs == counter.get_total_flops() // 2


def test_a_field_smaller_than_the_image_is_said_plainly():
    description = describe(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)))
    assert description.last_conv.receptive_field == (5, 5) and not description.covers_image
    assert "sees only 5x5 pixels, less than the 28x28 image" in str(description)


# The budget each model was built for; a model added to model.py is held to the project's 20,000.
BUDGETS = {"Net": 20_000, "NetCompact": 8_000, "NetTiny": 5_000, "NetMicro": 3_000}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_passes_the_checks_within_its_budget(name):
    checks = check_model(MODELS[name](), budget=BUDGETS.get(name, 20_000))
    assert checks.passed, str(checks)
    assert not check_model(MODELS[name](), budget=1_000).passed


class Careless(nn.Module):
    """What the checks are there to catch: no BatchNorm, no dropout, a fully connected head on a flat
    7x7 map, probabilities rather than log-probabilities, a small receptive field."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1)).softmax(dim=1)


def test_the_checks_fail_what_they_should_and_say_what_they_found():
    checks = check_model(Careless())
    failed = {check for check, passed, _ in checks.rows if not passed}
    assert failed == {"BatchNorm", "Dropout", "global average pooling", "no fully connected layer",
                      "output (N, 10) of log-probabilities", "receptive field covers the image"}
    assert not checks.passed and "some checks FAIL" in str(checks)
    assert "fully connected layer allowed" in {check for check, passed, _ in
                                               check_model(Careless(), allow_linear=True).rows if passed}


def test_architecture_py_imports_only_torch_and_model():
    tree = ast.parse((ROOT / "architecture.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(name.split(".")[0] in {"torch", "model", "sys", "typing", "argparse"} for name in imported)


NEW_MODEL = '''

class MyNet(nn.Module):
    """A learner's own model, added at the end of model.py."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Dropout(dropout), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1))

    def forward(self, x):
        return F.log_softmax(self.head(self.features(x)).flatten(1), dim=1)
'''


@pytest.mark.slow  # three fresh processes that load torch
def test_a_model_added_to_model_py_trains_checks_and_describes_by_name(tmp_path):
    for path in ROOT.glob("*.py"):
        shutil.copy(path, tmp_path)
    with open(tmp_path / "model.py", "a") as file:
        file.write(NEW_MODEL)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, check=False)

    trained = run("train.py", "--model", "MyNet", "--dry-run", "--quiet", "--data-dir", DATA_DIR,
                  "--out", "run")
    assert trained.returncode == 0, trained.stderr
    assert "MyNet" in run("train.py", "--help").stdout
    described = run("architecture.py", "MyNet")
    assert described.returncode == 0, described.stdout + described.stderr
    assert "MyNet: all checks pass" in described.stdout and "features.14" in described.stdout


def test_the_brief_table_keeps_the_layers_that_change_the_field_and_the_totals():
    full, brief = describe(Net()).table(), describe(Net()).table(brief=True)
    assert "BatchNorm2d" in full and "BatchNorm2d" not in brief and "ReLU" not in brief
    assert full.splitlines()[-2:] == brief.splitlines()[-2:]  # the totals and the verdict
    assert sum("Conv2d" in line for line in brief.splitlines()) == 6
