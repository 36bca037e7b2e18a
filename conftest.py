"""What the tests share: the small setting they train with, the real data, and helpers to run the CLI."""

import os
from pathlib import Path

import pytest
import torch

from config import TrainConfig
from data import MNIST_FILES, load_mnist

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
# Every short training run of the tests: 10 batches of 100 training images, 500 test images. No weight
# average: over a few dozen steps it would still be close to the initial weights.
SMALL = {"train_limit": 1000, "test_limit": 500, "epochs": 2, "batch_size": 100, "ema": 0.0}


def flags(settings):
    """Command-line flags for TrainConfig ``settings``: {"train_limit": 10} -> ["--train-limit", "10"]."""
    return [text for name, value in settings.items() for text in ("--" + name.replace("_", "-"), str(value))]


SMALL_FLAGS = [*flags(SMALL), "--quiet"]


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


def without_timings(history):
    return [{key: value for key, value in row.items() if "seconds" not in key} for row in history]


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST tensors: {"train": (images, labels), "test": (images, labels)}."""
    return {"train": load_mnist(DATA_DIR, train=True), "test": load_mnist(DATA_DIR, train=False)}


@pytest.fixture
def raw_copy(tmp_path):
    """A data folder holding links to the genuine files, one of which a test may replace."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = Path(DATA_DIR, "MNIST", "raw").resolve()
    for name in MNIST_FILES:
        (raw / name).symlink_to(source / name)
    return raw
