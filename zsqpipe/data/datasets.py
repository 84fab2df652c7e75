"""Dataset registry.

``fashion_mnist`` reads the IDX files (gzip or not) from, in order: the configured ``data_dir`` (flat, or
torchvision's ``FashionMNIST/raw`` layout), then ``/usr/share/datasets/fashion-mnist/`` (Debian package
``dataset-fashion-mnist``), then torchvision's downloader when ``allow_download`` is true.
``cifar10``/``cifar100`` use torchvision's layout under ``data_dir`` (``cifar-10-batches-py``,
``cifar-100-python``); ``imagenet`` an ImageFolder tree ``data_dir/imagenet/{train,val}/<class>/*.JPEG``.
Small datasets are held in memory as uint8 tensors (N, C, H, W); ImageNet stays on disk.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zsqpipe.errors import DataError
from zsqpipe.names import DATASET_NAMES
from zsqpipe.registry import Registry

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_REAL_DATA_FORBIDDEN: list[str] = []  # non-empty inside forbid_real_data()
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool = True


DATASETS: Registry[DatasetInfo] = Registry("dataset", key="datasets", declared=DATASET_NAMES, error=DataError)
for _info in (
    DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), in_memory=False),
):
    DATASETS.add(_info.name, _info)


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)


@dataclass
class ImageData:
    """An in-memory split: uint8 images (N, C, H, W) and int64 labels.

    ``files`` are the source files read; ``source_dir`` is the directory that, given as ``data_dir``, finds
    exactly these files again.
    """

    images: torch.Tensor
    labels: torch.Tensor
    files: list[Path]
    source_dir: Path

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index], self.files, self.source_dir)


def _read_idx(path: Path) -> np.ndarray:
    _check_allowed(str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged compressed data inside a .gz
        what = "gzip-compressed IDX file" if opener is gzip.open else "IDX file"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"cannot read {path}: {reason}; expected a readable {what}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file: magic number {raw[:4].hex() or 'missing'}, "
            "expected 0000080N (N = 1..4 dimensions)"
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {offset}-byte IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=object))
    if len(raw) - offset != expected:
        raise DataError(
            f"{path} is truncated or corrupt: {len(raw) - offset} bytes of data, expected {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _fashion_mnist(split: str, data_dir: Path, allow_download: bool) -> ImageData:
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    candidates = [
        data_dir,
        data_dir / "fashion_mnist",
        data_dir / "FashionMNIST" / "raw",
        DEBIAN_FASHION_MNIST,
    ]
    img, lbl = _find_idx(candidates, img_stem), _find_idx(candidates, lbl_stem)
    if (img is None or lbl is None) and allow_download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(data_dir), train=split == "train", download=True)
        except Exception as e:  # network errors vary by platform
            raise DataError(f"fashion_mnist: download into {data_dir} failed: {e}") from e
        img, lbl = _find_idx(candidates, img_stem), _find_idx(candidates, lbl_stem)
    if img is None or lbl is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DataError(
            f"fashion_mnist: {img_stem}[.gz] / {lbl_stem}[.gz] not found; tried {tried}"
            + ("" if allow_download else ", torchvision download (disabled: set data.allow_download: true)")
            + ". Install Debian's dataset-fashion-mnist or copy the IDX files into data.data_dir."
        )
    images, labels = _read_idx(img), _read_idx(lbl)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"fashion_mnist: {img} and {lbl} do not form an image/label pair: shapes {list(images.shape)} and "
            f"{list(labels.shape)}, expected [N, 28, 28] and [N]"
        )
    if img.parent != lbl.parent:
        raise DataError(
            f"fashion_mnist: {img.name} and {lbl.name} were found in different folders "
            f"({img.parent}, {lbl.parent}); keep the four IDX files together"
        )
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        [img, lbl],
        img.parent.resolve(),
    )


def _cifar(name: str, split: str, data_dir: Path, allow_download: bool) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (CIFAR100, "cifar-100-python")
    roots = [data_dir, data_dir / name]
    root = next((r for r in roots if (r / folder).is_dir()), None)
    if root is None and not allow_download:
        tried = ", ".join(str(r / folder) for r in roots)
        raise DataError(
            f"{name}: torchvision folder not found; tried {tried} (download disabled: set "
            f"data.allow_download: true, or unpack the python version of {name} into data.data_dir)"
        )
    try:
        ds = cls(str(root or data_dir), train=split == "train", download=allow_download and root is None)
    except RuntimeError as e:
        raise DataError(f"{name}: {e}") from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    root = Path(root or data_dir).resolve()
    files = sorted(p for p in (root / folder).iterdir() if p.is_file())
    return ImageData(images, torch.tensor(ds.targets, dtype=torch.int64), files, root)


@contextlib.contextmanager
def forbid_real_data(reason: str = "zero-shot synthesis"):
    """Inside this block, loading any real dataset raises :class:`DataError` (enforces data-free stages)."""
    _REAL_DATA_FORBIDDEN.append(reason)
    try:
        yield
    finally:
        _REAL_DATA_FORBIDDEN.pop()


def _check_allowed(what: str) -> None:
    if _REAL_DATA_FORBIDDEN:
        raise DataError(f"{_REAL_DATA_FORBIDDEN[-1]} must not read real data, but it tried to load {what}")


def load_dataset(name: str, split: str, data_dir: str | os.PathLike = "data", allow_download: bool = False):
    """Load ``split`` ("train" or "test") of dataset ``name``.

    Returns an :class:`ImageData` for in-memory datasets and a torchvision ``ImageFolder`` for ImageNet.
    """
    _check_allowed(f"{name}/{split}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    info = dataset_info(name)
    data_dir = Path(data_dir)
    if name == "fashion_mnist":
        return _fashion_mnist(split, data_dir, allow_download)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, split, data_dir, allow_download)
    # imagenet
    from torchvision.datasets import ImageFolder

    folder = data_dir / "imagenet" / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataError(
            f"imagenet: {folder} not found; expected an ImageFolder tree data_dir/imagenet/{{train,val}}/<class>/"
        )
    return ImageFolder(str(folder), transform=imagenet_transform(split, info))


def imagenet_transform(split: str, info: DatasetInfo):
    from torchvision import transforms as T

    norm = T.Normalize(info.mean, info.std)
    if split == "train":
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded split of ``range(n)`` into (train, validation) index tensors (sorted)."""
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values
