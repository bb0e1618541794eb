import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CIFAR10_HEAD = Path(os.environ.get("CIFARLAB_CIFAR10_HEAD", REPO.parent / "shared" / "data" / "cifar10-head"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def cifar10_head() -> Path:
    if not (CIFAR10_HEAD / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 head not found at {CIFAR10_HEAD} (set CIFARLAB_CIFAR10_HEAD)")
    return CIFAR10_HEAD


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not any(FASHION_MNIST.glob("train-images-idx3-ubyte*")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return FASHION_MNIST


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets an empty dataset cache, so nothing depends on what this machine downloaded."""
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "cache"))
