import ast
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import config
from conftest import ROOT
from model import MODELS, Net, NetCompact, NetMicro, NetTiny


def parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_budgets():
    assert parameters(Net()) < 20_000
    assert parameters(NetCompact()) < 8_000
    assert parameters(NetTiny()) < 5_000
    assert parameters(NetMicro()) < 3_000


@pytest.mark.parametrize("name", MODELS)
def test_built_from_conv_batchnorm_dropout_and_global_average_pooling(name):
    model = MODELS[name]()
    kinds = {type(module) for module in model.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d} <= kinds
    assert any(isinstance(module, nn.Dropout) and module.p > 0 for module in model.modules())
    assert model.pool.output_size in (1, (1, 1))
    assert nn.Linear not in kinds, "no fully connected layer: some course rubrics forbid one"
    # After the pooling, a 1x1 convolution maps the pooled channels straight to the 10 classes.
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert model.classifier is convs[-1] and convs[-1].kernel_size == (1, 1)
    assert (convs[-1].in_channels, convs[-1].out_channels) == (convs[-2].out_channels, 10)


@pytest.mark.parametrize("cls, full", [(NetCompact, 1), (NetTiny, 2), (NetMicro, 1)])
def test_the_small_models_are_depthwise_separable_after_their_full_convolutions(cls, full):
    convs = [module for module in cls().modules() if isinstance(module, nn.Conv2d)][:-1]  # less the head
    assert all(conv.kernel_size == (3, 3) and conv.groups == 1 for conv in convs[:full])
    separable = convs[full:]
    assert separable and len(separable) % 2 == 0
    for depthwise, pointwise in zip(separable[::2], separable[1::2]):
        assert depthwise.kernel_size == (3, 3) and depthwise.groups == depthwise.in_channels > 1
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1
    assert all(conv.groups == 1 for conv in Net().modules() if isinstance(conv, nn.Conv2d))


@pytest.mark.parametrize("name", MODELS)
def test_dropout_acts_in_training_and_not_in_evaluation(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    # BatchNorm uses the batch's statistics in training mode, the same for both calls: only dropout's
    # random masks can tell them apart.
    assert not torch.equal(model(x), model(x))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert torch.equal(model(x), model(x))


def test_the_model_names_read_without_torch_are_the_classes_model_py_defines():
    assert config.model_names() == tuple(MODELS) == ("Net", "NetCompact", "NetTiny", "NetMicro")


@pytest.mark.parametrize("name", MODELS)
def test_output_rows_are_log_probabilities(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert (out <= 0).all()
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(5))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Net()
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_with_same_dropout_mask():
        torch.manual_seed(1)
        return F.nll_loss(model(images), labels)

    before = loss_with_same_dropout_mask()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_with_same_dropout_mask()
    assert after < before - 0.01


@pytest.mark.parametrize(("images", "error", "words"), [
    (torch.zeros(4, 28, 28), ValueError, "shaped (N, 1, 28, 28)"),
    (torch.zeros(4, 3, 28, 28), ValueError, "got (4, 3, 28, 28)"),
    (torch.zeros(4, 1, 32, 32), ValueError, "got (4, 1, 32, 32)"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), TypeError, "torch.uint8"),
    ([[0.0] * 28] * 28, TypeError, "got list"),
])
def test_forward_refuses_wrong_input_with_a_clear_message(images, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        Net()(images)


def test_predict_takes_one_image_or_a_batch_and_keeps_the_mode():
    torch.manual_seed(0)
    model = Net().train()
    batch = torch.randn(6, 1, 28, 28)
    assert model.predict(batch).shape == (6,)
    assert model.predict(batch[0]).shape == (1,)
    assert model.predict(batch[0, 0]).shape == (1,)
    assert model.predict(batch[0, 0]) == model.predict(batch)[0]
    assert model.training
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\), \(1, 28, 28\) or \(28, 28\), got \(2, 28, 28\)"):
        model.predict(torch.zeros(2, 28, 28))
    with pytest.raises(TypeError, match="torch.int64"):
        model.predict(torch.zeros(1, 28, 28, dtype=torch.long))
    with pytest.raises(TypeError, match="got ndarray"):
        model.predict(batch.numpy())


def test_model_py_imports_only_torch():
    tree = ast.parse((ROOT / "model.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and all(name == "torch" or name.startswith("torch.") for name in imported), imported


@pytest.mark.slow  # a fresh process that loads torch
def test_model_py_copied_alone_imports_and_trains(tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path)
    script = """
import torch, torch.nn.functional as F
import model
for cls in model.MODELS.values():
    net = cls()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = F.nll_loss(net(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,)))
    loss.backward()
    optimizer.step()
    print(cls.__name__, net.predict(torch.randn(3, 1, 28, 28)).tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    assert "Net [" in result.stdout and "NetCompact [" in result.stdout and "NetTiny [" in result.stdout


@pytest.mark.slow  # a fresh process that loads torch
def test_the_names_read_from_the_source_agree_with_the_classes_for_other_shapes_of_class(tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path)
    shutil.copy(ROOT / "config.py", tmp_path)
    more = """

class Stack(nn.Sequential):
    pass


class Wide(nn.Conv2d):
    pass


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()


class Later(Net):
    pass


class Helper:
    pass
"""
    with open(tmp_path / "model.py", "a") as file:
        file.write(more)
    script = ("import config, model; "
              "print(list(config.model_names()) == list(model.MODELS), list(model.MODELS))")

    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stdout.split(" ", 1)[0] == "True", result.stdout + result.stderr
    assert result.stdout.strip().endswith("'NetMicro', 'Stack', 'Later']")
