"""Datasets (registry, seeded splits, fast in-memory loaders); knows nothing of Snakemake or MLflow."""

from zsqpipe.data.datasets import (
    DATASETS,
    DatasetInfo,
    ImageData,
    dataset_info,
    forbid_real_data,
    load_dataset,
    train_val_split,
)
from zsqpipe.data.loaders import BatchLoader, make_loader

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DatasetInfo",
    "ImageData",
    "dataset_info",
    "forbid_real_data",
    "load_dataset",
    "make_loader",
    "train_val_split",
]
