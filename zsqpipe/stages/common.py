"""Helpers shared by stages (no quantization imports here: fp_model's code version must not depend on them)."""

from __future__ import annotations

from zsqpipe.data import DatasetInfo, make_loader


def eval_loader(data, info: DatasetInfo, batch_size: int, device, channels_last: bool = True):
    return make_loader(data, info, batch_size, train=False, device=device, channels_last=channels_last)
