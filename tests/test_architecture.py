"""The architecture table and the model checks, against independent measurements, on the shipped models,
on learners' models and on every model of model.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from learner_models import LinearNet, S7Net, StarterNet
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import architecture
from architecture import ModelError, check_model, describe
from config import BUDGETS, build_model
from conftest import DATA_DIR, MODELS, ROOT, SHIPPED, project_copy, run


def gradient_field(layers, size=96):
    """The receptive field of the centre unit of ``layers``' output, measured: the extent of the input
    pixels whose gradient is not zero. Max-pools become average pools and ReLUs identities (the same
    windows), so that every pixel in the field passes gradient."""
    layers = copy.deepcopy(layers).eval()
    for name, module in list(layers.named_modules()):
        parent = layers.get_submodule(name.rpartition(".")[0]) if "." in name else layers
        if isinstance(module, nn.MaxPool2d):
            setattr(parent, name.rpartition(".")[2], nn.AvgPool2d(module.kernel_size, module.stride,
                                                                  module.padding))
        elif isinstance(module, nn.ReLU):
            setattr(parent, name.rpartition(".")[2], nn.Identity())
    torch.manual_seed(0)
    x = torch.randn(1, layers[0].in_channels, size, size, requires_grad=True)
    out = layers(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows, columns = (x.grad[0].abs().sum(dim=0) > 0).nonzero().unbind(1)
    return (rows.max() - rows.min() + 1).item(), (columns.max() - columns.min() + 1).item()


@pytest.mark.parametrize("name", SHIPPED)
def test_the_receptive_field_of_each_shipped_model_is_what_its_gradient_reaches(name):
    model = build_model(name)
    index = int(describe(model).last_conv.name.rpartition(".")[2])
    assert describe(model).last_conv.receptive_field == gradient_field(model.features[:index + 1])


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
    for row in description.rows:
        if row.window is not None:
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = row.window
            shape = (row.output[0], (shape[1] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                     (shape[2] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        assert row.output == shape, row
    assert shape == tuple(layers(torch.zeros(1, 1, 28, 28)).shape[1:])


class Functional(nn.Module):
    """The same layers as STACKS' first, written as functional calls in forward."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 4, 5, stride=2, padding=2), nn.Conv2d(4, 4, 3)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        x = F.conv2d(F.relu(self.first(x)), self.weight, padding=2, dilation=2)
        return self.second(F.max_pool2d(x, 3, stride=2, padding=1))


def test_functional_layers_are_followed_like_modules():
    modules = describe(nn.Sequential(*STACKS["stride, padding, dilation"]))
    functional = describe(Functional())
    assert [row.kind for row in functional.rows] == ["Conv2d", "F.relu", "F.conv2d", "F.max_pool2d", "Conv2d"]
    assert [row.receptive_field for row in functional.rows if row.window] == [
        row.receptive_field for row in modules.rows if row.window]
    assert functional.params == sum(p.numel() for p in Functional().parameters())
    assert functional.uncounted == ["weight"]


@pytest.mark.parametrize("name", MODELS)
def test_parameters_and_multiply_accumulates_add_up(name):
    model = build_model(name)
    description = describe(model)
    assert description.params == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 1, 28, 28))
    assert description.macs == counter.get_total_flops() // 2


@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_checked_and_the_shipped_ones_pass_within_their_budgets(name):
    checks = check_model(build_model(name), budget=BUDGETS.get(name, 20_000))
    assert len(checks.rows) == 7 and str(checks).startswith(name)
    if name in SHIPPED:
        assert checks.passed, str(checks)
        assert not check_model(build_model(name), budget=1_000).passed


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


def failed(model, budget=20_000, **options):
    return {check for check, passed, _ in check_model(model, budget, **options).rows if not passed}


def test_the_checks_fail_what_they_should_and_say_what_they_found():
    assert failed(Careless()) == {"BatchNorm", "Dropout", "global average pooling",
                                  "no fully connected layer",
                                  "output (N, 10) of log-probabilities",
                                  "receptive field: a digit (20x20), then the image"}
    assert "returns probabilities (softmax), not log-probabilities" in str(check_model(Careless(), 20_000))
    assert "no fully connected layer" not in failed(Careless(), allow_linear=True)
    small = describe(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)))
    assert "sees only 5x5 pixels, less than a digit (20x20)" in str(small)


def test_learners_models_are_described_and_checked_as_written():
    s7, linear, starter = describe(S7Net()), describe(LinearNet()), describe(StarterNet())
    # The classic S7 layout: its last 3x3 convolution sees 22x22 (a whole digit), GAP the whole image.
    assert s7.last_conv.receptive_field == (22, 22) and s7.sees_digit
    assert failed(S7Net(), budget=8_000) == set()
    # Functional max-pools are followed; after x.view the linear layer sees the whole 7x7 map.
    assert [row.receptive_field[0] for row in linear.rows if row.kind == "F.max_pool2d"] == [4, 10]
    assert [row.kind for row in linear.rows[-3:]] == ["x.view", "Linear", "F.log_softmax"]
    assert failed(LinearNet()) == {"global average pooling", "no fully connected layer",
                                   "receptive field: a digit (20x20), then the image"}
    assert starter.params == 6_379_786 and "BatchNorm" in failed(StarterNet())


class Counted(nn.Module):
    """A block run six times, a parameter of its own, a layer never used and GAP written as a function."""

    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.scale, self.unused = nn.Parameter(torch.ones(40_000)), nn.Linear(5, 5)
        self.norm, self.head = nn.BatchNorm2d(16), nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        for _ in range(6):
            x = F.dropout(F.relu(self.norm(self.block(x))), 0.1, self.training)
        return F.log_softmax(self.head(F.adaptive_avg_pool2d(x, 1) * self.scale[0]).flatten(1), dim=1)


def test_the_budget_counts_every_parameter_once_and_functional_gap_counts():
    checks = check_model(Counted(), budget=20_000)
    assert ("parameters < 20,000", False, "42,712") in checks.rows
    blocks = [row.params for row in describe(Counted()).rows if row.name.startswith("block")]
    assert blocks == [2_320] + [0] * 5  # counted where it first runs
    assert not failed(Counted(), budget=50_000)
    assert "in no layer listed: scale, unused.weight, unused.bias" in str(describe(Counted()))


def test_a_forward_that_fails_is_one_line():
    broken = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(10, 10))
    with pytest.raises(ModelError) as caught:
        describe(broken)
    assert str(caught.value).startswith("Sequential's forward fails on a batch shaped (2, 1, 28, 28) "
                                        "(RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert "\n" not in str(caught.value)


def test_architecture_py_checks_the_shipped_models_against_their_own_budgets(capsys):
    assert architecture.main([]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if "all checks pass" in line] == list(SHIPPED)
    assert "parameters < 8,000" in out and "parameters < 3,000" in out
    assert "(features.15) sees 30x30 pixels: a whole digit; the output sees the whole 28x28 image" in out
    assert describe(build_model("Net")).output_field == (54, 54)
    assert architecture.main(["NetMicro", "--budget", "2000"]) == 1
    capsys.readouterr()
    assert architecture.main(["Net", "--short"]) == 0
    short = capsys.readouterr().out
    assert "BatchNorm2d" not in short and sum("Conv2d" in line for line in short.splitlines()) == 6
    with pytest.raises(SystemExit) as caught:
        architecture.main(["ResNet"])
    assert caught.value.code == 2 and "unknown model 'ResNet'" in capsys.readouterr().err


LEARNERS = ["S7Net", "LinearNet", "StarterNet"]


@pytest.mark.slow  # a copy of the project, its model tests, and a dry run and the checks of each model
def test_three_learner_models_added_to_model_py_train_and_are_checked_and_tested_by_name(tmp_path):
    learners = (ROOT / "tests" / "learner_models.py").read_text()
    project_copy(tmp_path, "\n\n" + learners.split("# --- appended to model.py from here ---")[1])
    tests = run(tmp_path, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                "tests/test_model.py", "tests/test_architecture.py")
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "Net" in run(tmp_path, "train.py", "--help").stdout.split("StarterNet")[0]
    for name in LEARNERS:
        trained = run(tmp_path, "train.py", "--model", name, "--dry-run", "--quiet", "--data-dir", DATA_DIR)
        assert trained.returncode == 0 and "epoch  1/1" in trained.stdout, trained.stderr
        checked = run(tmp_path, "architecture.py", name, "--brief", "S7")
        assert checked.returncode == (0 if name == "S7Net" else 1), checked.stdout + checked.stderr
        assert f"{name}: input 1x28x28" in checked.stdout and "parameters < 8,000" in checked.stdout
    assert "LinearNet trains in the standard memory layout" in run(
        tmp_path, "train.py", "--model", "LinearNet", "--dry-run", "--quiet").stdout
