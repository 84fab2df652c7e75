"""Stage ``data``: locate and verify a dataset, fix the seeded train/validation split, write a manifest.

Every later stage reads the dataset through this manifest (:func:`load_prepared`), which re-checks the
files' SHA-256, so a changed or corrupt dataset file is reported instead of silently used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zsqpipe.config import DataConfig
from zsqpipe.data import DatasetInfo, ImageData, dataset_info, load_dataset, train_val_split
from zsqpipe.errors import IntegrityError
from zsqpipe.io import read_json, sha256_file, write_json

MANIFEST_VERSION = 2


def prepare_data(dataset: str, cfg: DataConfig, out_manifest: Path) -> dict:
    """Write ``out_manifest`` describing ``dataset``: source files + hashes, sizes, the validation indices."""
    info = dataset_info(dataset)
    train = load_dataset(dataset, "train", cfg.data_dir, cfg.allow_download)
    test = load_dataset(dataset, "test", cfg.data_dir, cfg.allow_download)
    _, val_idx = train_val_split(len(train), cfg.val_size, cfg.split_seed)
    manifest = {
        "version": MANIFEST_VERSION,
        "dataset": dataset,
        "info": asdict(info),
        "config": asdict(cfg),
        "n_train": len(train) - len(val_idx),
        "n_val": len(val_idx),
        "n_test": len(test) if cfg.test_subset is None else min(cfg.test_subset, len(test)),
        "val_indices": val_idx.tolist(),
    }
    if isinstance(train, ImageData):
        manifest["source_dir"] = str(train.source_dir)
        files = sorted({str(p.resolve()) for p in train.files + test.files})
        manifest["files"] = {f: sha256_file(f) for f in files if Path(f).is_file()}
        manifest["shape"] = list(train.images.shape[1:])
        manifest["class_counts_train"] = torch.bincount(train.labels, minlength=info.num_classes).tolist()
    else:  # ImageFolder: record the listing, not the (huge) contents
        manifest["source_dir"] = str(Path(cfg.data_dir).resolve())
        manifest["files"] = {}
        manifest["classes"] = train.classes
    write_json(out_manifest, manifest)
    return manifest


@dataclass
class PreparedData:
    info: DatasetInfo
    train: object  # ImageData or a torch Dataset
    val: object
    test: object
    manifest: dict


def load_prepared(manifest_path: str | Path, verify: bool = True) -> PreparedData:
    """Load the splits described by a ``data`` manifest (train = training set minus validation indices)."""
    m = read_json(manifest_path)
    if m.get("version") != MANIFEST_VERSION:
        raise IntegrityError(
            f"{manifest_path}: manifest version {m.get('version')!r}, expected {MANIFEST_VERSION}"
        )
    if verify:
        for f, digest in m.get("files", {}).items():
            if not Path(f).is_file():
                raise IntegrityError(f"{f}: dataset file listed in {manifest_path} is missing")
            if sha256_file(f) != digest:
                raise IntegrityError(f"{f}: SHA-256 differs from {manifest_path}; rerun the data stage")
    cfg = DataConfig(**m["config"])
    info = dataset_info(m["dataset"])
    source = m["source_dir"]  # the folder the data stage read: the same files, whatever the cwd
    train = load_dataset(m["dataset"], "train", source, False)
    test = load_dataset(m["dataset"], "test", source, False)
    if cfg.test_subset is not None and isinstance(test, ImageData):
        test = test.subset(torch.arange(min(cfg.test_subset, len(test))))
    val_idx = torch.tensor(m["val_indices"], dtype=torch.long)
    mask = torch.ones(len(train), dtype=torch.bool)
    mask[val_idx] = False
    train_idx = mask.nonzero().squeeze(1)
    if isinstance(train, ImageData):
        return PreparedData(info, train.subset(train_idx), train.subset(val_idx), test, m)
    from torch.utils.data import Subset

    from zsqpipe.data.datasets import imagenet_transform

    plain = load_dataset(m["dataset"], "train", source, False)
    plain.transform = imagenet_transform("test", info)
    return PreparedData(info, Subset(train, train_idx.tolist()), Subset(plain, val_idx.tolist()), test, m)
