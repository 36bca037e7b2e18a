import os

import pytest

from data import load_mnist
from utils import TrainConfig

# pytest re-executes S6.ipynb through nbval: in a short setting unless S6_SMOKE=0 asks for the full run.
os.environ.setdefault("S6_SMOKE", "1")


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST tensors: {"train": (images, labels), "test": (images, labels)}."""
    data_dir = TrainConfig().data_dir
    return {"train": load_mnist(data_dir, train=True), "test": load_mnist(data_dir, train=False)}
