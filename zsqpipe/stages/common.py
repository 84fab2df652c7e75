"""Helpers shared by stages (no quantization imports here: fp_model's code version must not depend on them)."""

from __future__ import annotations

import torch

from zsqpipe.data import DatasetInfo, ImageData, make_loader

EVAL_BATCH = 1000
PROBE_IMAGES = 1000  # the first test images: evaluate re-checks the saved model on them


def eval_loader(data, info: DatasetInfo, batch_size: int, device, channels_last: bool = True):
    return make_loader(data, info, batch_size, train=False, device=device, channels_last=channels_last)


def split_test(test, info, device):
    """(first PROBE_IMAGES test images, the rest) as loaders; together they are the whole test set."""
    if not isinstance(test, ImageData) or len(test) <= PROBE_IMAGES:
        return eval_loader(test, info, EVAL_BATCH, device), None
    head, rest = torch.arange(PROBE_IMAGES), torch.arange(PROBE_IMAGES, len(test))
    return (eval_loader(test.subset(head), info, EVAL_BATCH, device),
            eval_loader(test.subset(rest), info, EVAL_BATCH, device))  # fmt: skip


def combine(a: dict, b: dict) -> dict:
    """Merge two ``evaluate`` results over disjoint sets (exact for the top-k counts)."""
    n = a["n"] + b["n"]
    out = {
        k: 100.0 * (round(a[k] * a["n"] / 100) + round(b[k] * b["n"] / 100)) / n
        for k in a
        if k.startswith("top")
    }
    out["loss"] = (a["loss"] * a["n"] + b["loss"] * b["n"]) / n
    out["n"] = n
    return out
