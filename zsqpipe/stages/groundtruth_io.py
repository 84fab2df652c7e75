"""Reading ``groundtruth`` files, and a split helper, for the NAS stages.

Kept apart from :mod:`zsqpipe.stages.groundtruth` so that ``supernet-train``'s code version does not cover
the stand-alone training code (a change there reruns the ground truth, whose new files then rerun the
supernets that read them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zsqpipe.data import ImageData
from zsqpipe.errors import IntegrityError
from zsqpipe.io import read_json


def first_images(data, n: int | None):
    """The first ``n`` items of a split (all when ``n`` is None or larger)."""
    if n is None or n >= len(data):
        return data
    if isinstance(data, ImageData):
        return data.subset(torch.arange(n))
    from torch.utils.data import Subset

    return Subset(data, list(range(n)))


def load_groundtruth(paths: list[Path]) -> dict:
    """Join the chunk files of one dataset's ground truth: ``{dataset, source, sample, records (in sample
    order), wall_time_s (sum over chunks)}``; incomplete, mixed or duplicate chunks are one-line errors."""
    if not paths:
        raise IntegrityError("groundtruth: no ground-truth files given")
    chunks = []
    for p in paths:
        c = read_json(p)
        for key in ("dataset", "chunk", "n_chunks", "sample", "source", "positions", "records"):
            if key not in c:
                raise IntegrityError(f"{p}: not a groundtruth file (no {key!r})")
        chunks.append((p, c))
    p0, first = chunks[0]
    for p, c in chunks[1:]:
        for key in ("dataset", "n_chunks", "sample", "source"):
            if c[key] != first[key]:
                raise IntegrityError(f"{p}: {key} {c[key]!r} differs from {p0}'s {first[key]!r}")
    have = sorted(c["chunk"] for _, c in chunks)
    if have != list(range(first["n_chunks"])):
        raise IntegrityError(
            f"groundtruth of {first['dataset']}: chunks {have} given, expected 0..{first['n_chunks'] - 1}"
        )
    records = []
    for _, c in sorted(chunks, key=lambda pc: pc[1]["chunk"]):
        records += c["records"]
    n_total = first["sample"]["n_total"]
    if len(records) != n_total or len({r["index"] for r in records}) != n_total:
        raise IntegrityError(
            f"groundtruth of {first['dataset']}: {len(records)} records for a sample of {n_total} cells"
        )
    return {
        "dataset": first["dataset"],
        "source": first["source"],
        "table": first.get("table"),
        "sample": first["sample"],
        "config": first.get("config"),
        "records": records,
        "wall_time_s": sum(c.get("wall_time_s", 0.0) for _, c in chunks),
    }
