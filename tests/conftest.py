import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_fixture(root: Path, n_train: int = 240, n_test: int = 120, seed: int = 0) -> Path:
    """Tiny Fashion-MNIST look-alike: class k has a bright k-th row band, so it is learnable."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y + 4 : 2 * y + 7, :] = 230
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fashion_dir(tmp_path) -> Path:
    return make_fashion_fixture(tmp_path / "fmnist")


@pytest.fixture
def no_debian_data(monkeypatch, tmp_path):
    """Hide /usr/share/datasets/fashion-mnist so only the fixture is found."""
    import zsqpipe.data.datasets as ds

    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
