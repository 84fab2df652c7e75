import contextlib
import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from zsqpipe.job import Job

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


@contextlib.contextmanager
def hidden_debian_data(tmp: Path) -> Iterator[None]:
    """``no_debian_data`` for module-scoped fixtures (pytest's ``monkeypatch`` is function-scoped)."""
    import zsqpipe.data.datasets as ds

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds, "DEBIAN_FASHION_MNIST", tmp / "no-debian")
        yield


def prepare_fixture_data(tmp: Path, val_size: int = 40, **fixture_kw) -> Path:
    """The tiny Fashion-MNIST look-alike under ``tmp/fmnist`` prepared by ``zsqpipe data`` (call inside
    :func:`hidden_debian_data`); returns ``tmp/manifest.json``."""
    from zsqpipe.config import DataConfig
    from zsqpipe.stages.data import prepare_data

    root = make_fashion_fixture(tmp / "fmnist", **fixture_kw)
    prepare_data("fashion_mnist", DataConfig(data_dir=str(root), val_size=val_size), tmp / "manifest.json")
    return tmp / "manifest.json"


def prepare_fp_and_shards(tmp: Path, fp: dict, method: str, n: int = 100, shard_size: int = 40) -> None:
    """Data manifest, a 1-epoch FP ResNet-20 (``tmp/fp.pt``) and ``n`` random synthetic samples for ``method``
    in shards of ``shard_size`` rows (``tmp/samples``; 100 / 40 = a ragged last shard)."""
    from zsqpipe.config import FPConfig
    from zsqpipe.data.shards import write_shards
    from zsqpipe.io import sha256_file
    from zsqpipe.stages.fp_model import run_fp_model

    manifest = prepare_fixture_data(tmp)
    run_fp_model(manifest, "resnet20", FPConfig(**{**fp, "epochs": 1}), tmp / "fp.pt", tmp / "fp.json",
                 Job.quiet(device="cpu", threads=1))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    write_shards(tmp / "samples", images, labels, torch.zeros(n), method, 0, shard_size=shard_size,
                 provenance={"fp_checkpoint_sha256": sha256_file(tmp / "fp.pt")})  # fmt: skip


def same_state(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
