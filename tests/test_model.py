"""model.py, and the models found by name: the shipped ones by their names, every model on what any
model must do."""

import ast
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import config
from config import ConfigError, build_model
from conftest import CPU, MODELS, ROOT, SHIPPED
from model import Net, NetCompact, NetMicro, NetNano, NetTiny, predict
from utils import prepare_model


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_models_end_in_a_1x1_convolution_to_the_ten_digits_and_trace(name):
    # Their budgets, BatchNorm, dropout, GAP and no linear layer: check_model, in test_architecture.py.
    model = build_model(name)
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert model.classifier is convs[-1] and convs[-1].kernel_size == (1, 1)
    assert (convs[-1].in_channels, convs[-1].out_channels) == (convs[-2].out_channels, 10)
    torch.fx.symbolic_trace(model)  # nothing in forward that a tracer cannot follow


@pytest.mark.parametrize("cls, full", [(NetCompact, 1), (NetTiny, 2), (NetMicro, 1), (NetNano, 1)])
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
def test_every_model_trains_here_and_is_deterministic_in_evaluation(name):
    # prepare_model refuses a model whose output is not log-probabilities of shape (N, 10); dropout, which
    # acts in training, is found in each shipped model's forward by check_model.
    torch.manual_seed(0)
    model = prepare_model(build_model(name), CPU, log=lambda line: None).eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model(x))


def test_predict_takes_one_image_or_a_batch_of_any_float_and_keeps_the_mode(mnist):
    torch.manual_seed(0)
    model = Net().train()
    batch = (mnist["test"][0][:6].unsqueeze(1).float() / 255 - 0.1307) / 0.3081
    digits = predict(model, batch)
    assert digits.shape == (6,) and model.training
    assert predict(model, batch[0]).tolist() == predict(model, batch[0, 0]).tolist() == digits[:1].tolist()
    assert torch.equal(predict(model, batch.double()), digits)
    # A digit on grey paper (background 0.2, not black), normalised: inside the normalised range.
    grey = (0.2 + 0.8 * mnist["test"][0][:6].unsqueeze(1).float() / 255 - 0.1307) / 0.3081
    assert grey.min() > 0 and predict(model, grey).shape == (6,)


@pytest.mark.parametrize(("images", "error", "words"), [
    (torch.full((2, 1, 28, 28), float("nan")), ValueError, "NaN or infinite"),
    (torch.randint(0, 256, (3, 1, 28, 28)).float(), ValueError, "normalise 0-255 pixels"),
    (torch.rand(3, 1, 28, 28), ValueError, "image 0 has every value inside [0, 1]"),
    (torch.zeros(2, 28, 28) - 0.42, ValueError,
     "shaped (N, 1, 28, 28), (1, 28, 28) or (28, 28), got (2, 28, 28)"),
    (torch.zeros(4, 3, 28, 28), ValueError, "got (4, 3, 28, 28)"),
    (torch.zeros(1, 28, 28, dtype=torch.long), TypeError, "torch.int64"),
    (torch.zeros(28, 28).numpy(), TypeError, "got ndarray"),
])
def test_predict_refuses_images_that_would_give_an_answer_without_meaning(images, error, words):
    with pytest.raises(error) as caught:
        predict(Net(), images)
    assert words in str(caught.value)


def test_model_py_imports_only_torch_and_shows_net_first():
    source = (ROOT / "model.py").read_text()
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and all(name == "torch" or name.startswith("torch.") for name in imported), imported
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes[0].name == "Net" and classes[0].lineno <= 80


@pytest.mark.slow  # a fresh process that loads torch
def test_model_py_copied_alone_imports_and_trains(tmp_path):
    shutil.copy(ROOT / "model.py", tmp_path)
    script = f"""
import torch, torch.nn.functional as F
import model
for name in {SHIPPED!r}:
    cls = getattr(model, name)
    net = cls()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    F.nll_loss(net(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,))).backward()
    optimizer.step()
    print(cls.__name__, model.predict(net, torch.randn(3, 1, 28, 28)).tolist())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == list(SHIPPED)


def test_the_model_names_are_read_from_the_source_for_every_shape_of_class():
    assert config.model_names()[:len(SHIPPED)] == SHIPPED
    classes = config.classes_in("""
from torch import nn
class Stack(nn.Sequential): pass
class Wide(nn.Conv2d): pass
class Block(nn.Module):
    def __init__(self, channels, *, kernel): super().__init__()
class Later(Block): pass
class Fine(nn.Module):
    def __init__(self, width=8, *, kernel=3): super().__init__()
class Helper: pass
""")
    assert classes == {"Stack": (), "Wide": ("those of nn.Conv2d",), "Block": ("channels", "kernel"),
                       "Later": ("channels", "kernel"), "Fine": ()}


@pytest.mark.parametrize(("source", "name", "words"), [
    ("class Net(nn.Module)\n", "Net", "model.py does not parse (expected ':', line 1)"),
    ("from torch import nn\nclass Block(nn.Module):\n    def __init__(self, width):\n        pass\n", "Block",
     "model 'Block' needs arguments (width) to be built: give them defaults"),
    ("from torch import nn\nclass Net(nn.Module):\n    pass\n", "ResNet",
     "unknown model 'ResNet': choose one of Net"),
    ("from torch import nn\nundefined()\nclass Net(nn.Module):\n    pass\n", "Net",
     "model.py does not import (NameError: name 'undefined' is not defined, model.py line 2)"),
    ("from torch import nn\nclass Net(nn.Module):\n  def __init__(self):\n    self.a = nn.ReLU()\n", "Net",
     "Net() fails (AttributeError: cannot assign module before Module.__init__() call"),
])
def test_a_model_py_that_cannot_give_the_model_is_answered_in_one_line(tmp_path, monkeypatch, source, name,
                                                                         words):
    (tmp_path / "model.py").write_text(source)
    monkeypatch.setattr(config, "MODEL_FILE", tmp_path / "model.py")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "model")
    with pytest.raises(ConfigError) as caught:
        build_model(name)
    assert words in str(caught.value) and "\n" not in str(caught.value), caught.value
