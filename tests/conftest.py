import os

import pytest

from utils import TrainConfig, load_mnist

# The notebook, re-executed by nbval in the same pytest run, trains briefly unless told otherwise.
os.environ.setdefault("S6_SMOKE", "1")


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST tensors: {"train": (images, labels), "test": (images, labels)}."""
    data_dir = TrainConfig().data_dir
    return {"train": load_mnist(data_dir, train=True), "test": load_mnist(data_dir, train=False)}
