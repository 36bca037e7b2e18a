"""What the tests share: the small setting they train with, the real data, and helpers to run the CLI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from config import TrainConfig, build_model, model_names
from data import MNIST_FILES, load_mnist, make_loaders

# pytest re-executes S6.ipynb through nbval: in a short setting unless S6_SMOKE=0 asks for the full run.
os.environ.setdefault("S6_SMOKE", "1")


def pytest_collection_modifyitems(items):
    # Even in its short setting the notebook takes a third of the fast loop: it runs with the slow tests.
    for item in items:
        if item.nodeid.startswith("S6.ipynb"):
            item.add_marker(pytest.mark.slow)


ROOT = Path(__file__).resolve().parent
CPU = torch.device("cpu")
# MNIST_DATA, else ./data; absolute, since some tests start processes in other folders.
DATA_DIR = os.path.abspath(TrainConfig().data_dir)
# The models shipped with the project, which tests may name; a model a learner adds is tested only on
# what every model must do.
SHIPPED = ("Net", "NetCompact", "NetTiny", "NetMicro", "NetNano")
MODELS = model_names()
# Every short training run of the tests: 10 batches of 100 training images, 500 test images. No weight
# average: over a few dozen steps it would still be close to the initial weights.
SMALL = {"train_limit": 1000, "test_limit": 500, "epochs": 2, "batch_size": 100, "ema": 0.0}


# SMALL as command-line flags: {"train_limit": 1000} -> ["--train-limit", "1000"].
SMALL_FLAGS = [*(word for key, value in SMALL.items() for word in ("--" + key.replace("_", "-"), str(value))),
               "--quiet"]
DRY_FLAGS = ["--dry-run", "--batch-size", "100", "--ema", "0", "--quiet"]  # two batches of each split


def cli(capsys, *args):
    """Run train.py's main in this process: (exit code, stdout, stderr)."""
    import train

    code = train.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, *args, words):
    """Run the CLI; check it refused with exit code 2 and one line holding ``words``."""
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err
    return err


def train(model="Net", seed=0, checkpoint=None, resume=False, device=CPU, **settings):
    """(model, history) of a quiet run of ``settings`` on top of SMALL, as train.py trains."""
    from utils import fit, prepare_model, seed_everything

    config = TrainConfig(model=model, seed=seed, **{**SMALL, **settings})
    seed_everything(seed, device, config.deterministic)
    network = prepare_model(build_model(model), device, log=lambda line: None)
    history = fit(network, *make_loaders(config, device), config, checkpoint=checkpoint, resume=resume,
                  progress=False, log=lambda line: None)
    return network, history


def without_timings(history):
    return [{key: value for key, value in row.items() if "seconds" not in key} for row in history]


def same_weights(first, second):
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def project_copy(folder, append=""):
    """The project's .py files copied into ``folder``, with ``append`` added to model.py."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in ROOT.glob("*.py"):
        shutil.copy(path, folder)
    (folder / "tests").mkdir(exist_ok=True)
    for path in (ROOT / "tests").glob("*.py"):
        shutil.copy(path, folder / "tests")
    shutil.copy(ROOT / "pyproject.toml", folder)
    with open(folder / "model.py", "a") as file:
        file.write(append)
    return folder


def run(folder, *args, timeout=600):
    """Run ``python *args`` in ``folder``, the data where MNIST_DATA says: the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "MNIST_DATA": DATA_DIR}, check=False)


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST tensors: {"train": (images, labels), "test": (images, labels)}."""
    return {"train": load_mnist(DATA_DIR, train=True), "test": load_mnist(DATA_DIR, train=False)}


@pytest.fixture
def offline(monkeypatch):
    """No internet: a download of MNIST fails at once."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])


@pytest.fixture
def raw_copy(tmp_path):
    """A data folder holding links to the genuine files, one of which a test may replace."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = Path(DATA_DIR, "MNIST", "raw").resolve()
    for name in MNIST_FILES:
        (raw / name).symlink_to(source / name)
    return raw


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if training starts."""
    import utils

    monkeypatch.setattr(utils, "fit", lambda *args, **kwargs: pytest.fail("training started"))


def ctrl_c_at_epoch(patch, number):
    """Make Ctrl-C arrive as the ``number``-th epoch trained under ``patch`` (a monkeypatch) begins."""
    import utils

    original, begun = utils.train_epoch, []

    def train_epoch(*args, **kwargs):
        begun.append(1)
        if len(begun) == number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    patch.setattr(utils, "train_epoch", train_epoch)
