"""Sharded sample files: Parquet shards + a manifest, written atomically and verified when read.

A shard is a Parquet file with one row per sample: ``image`` (fixed-size list of float32, the tensor in
C*H*W order), ``label`` (int64), ``difficulty`` (float32, 1 - p_teacher(label)), ``method`` (string) and
``seed`` (int64). The image shape is stored in the manifest and in the Parquet schema metadata, so pandas or
pyarrow read a shard without zsqpipe. ``manifest.json`` (written last) lists every shard with its row count
and SHA-256, the sample shape and dtype, and the provenance (FP checkpoint hash, config). The reader checks
the SHA-256 and row count of each shard before using it: a corrupt or truncated shard is reported, never
trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from zsqpipe.errors import IntegrityError
from zsqpipe.io import atomic_path, read_json, sha256_file, write_json

SHARD_FORMAT = "zsqpipe-shards/1"


def _table(images: np.ndarray, labels, difficulty, method: str, seed: int, shape) -> pa.Table:
    n = len(images)
    flat = pa.array(np.ascontiguousarray(images, dtype=np.float32).reshape(-1))
    image_col = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
    table = pa.table(
        {
            "image": image_col,
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "difficulty": pa.array(np.asarray(difficulty, dtype=np.float32)),
            "method": pa.array([method] * n, pa.string()),
            "seed": pa.array(np.full(n, seed, dtype=np.int64)),
        }
    )
    return table.replace_schema_metadata({"zsqpipe.shape": json.dumps(list(shape))})


def write_shards(
    out_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    difficulty: torch.Tensor,
    method: str,
    seed: int,
    shard_size: int = 1024,
    provenance: dict[str, Any] | None = None,
) -> dict:
    """Write samples as ``shard-00000.parquet`` ... plus ``manifest.json`` (last) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    shape = list(images.shape[1:])
    shards = []
    for i, start in enumerate(range(0, len(images), shard_size)):
        sl = slice(start, start + shard_size)
        name = f"shard-{i:05d}.parquet"
        table = _table(images[sl].numpy(), labels[sl].cpu().numpy(), difficulty[sl].cpu().numpy(), method, seed,
                       shape)  # fmt: skip
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        shards.append({"file": name, "rows": table.num_rows, "sha256": sha256_file(out_dir / name)})
    manifest = {
        "format": SHARD_FORMAT,
        "count": len(images),
        "shape": shape,
        "dtype": "float32",
        "method": method,
        "seed": seed,
        "num_classes_seen": int(labels.max()) + 1 if len(labels) else 0,
        "shards": shards,
        **(provenance or {}),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass
class ShardSet:
    """The verified contents of a shard manifest."""

    manifest_path: Path
    manifest: dict

    @classmethod
    def open(cls, manifest_path: str | Path) -> ShardSet:
        manifest_path = Path(manifest_path)
        m = read_json(manifest_path)
        if m.get("format") != SHARD_FORMAT:
            raise IntegrityError(
                f"{manifest_path}: not a zsqpipe shard manifest (format {m.get('format')!r})"
            )
        return cls(manifest_path, m)

    def verify(self) -> None:
        """Check that every listed shard exists and matches its SHA-256 (before a stage spends time training)."""
        for entry in self.manifest["shards"]:
            path = self.shard_path(entry)
            if not path.is_file():
                raise IntegrityError(f"{path}: shard listed in {self.manifest_path.name} is missing")
            if sha256_file(path) != entry["sha256"]:
                raise IntegrityError(
                    f"{path}: SHA-256 differs from {self.manifest_path.name} (corrupt or truncated shard); "
                    "rerun the synthesize stage"
                )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["shape"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def shard_path(self, entry: dict) -> Path:
        return self.manifest_path.parent / entry["file"]

    def read_shard(self, entry: dict) -> dict[str, torch.Tensor]:
        """Verify (SHA-256, rows, shape) and load one shard as tensors."""
        path = self.shard_path(entry)
        if not path.is_file():
            raise IntegrityError(f"{path}: shard listed in {self.manifest_path.name} is missing")
        if sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: SHA-256 differs from the manifest (corrupt or truncated shard)")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise IntegrityError(f"{path}: unreadable Parquet shard ({e})") from e
        if table.num_rows != entry["rows"]:
            raise IntegrityError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}")
        flat = table.column("image").combine_chunks().flatten().to_numpy()
        images = torch.from_numpy(flat.copy()).view(table.num_rows, *self.shape)
        return {
            "images": images,
            "labels": torch.from_numpy(table.column("label").to_numpy().copy()),
            "difficulty": torch.from_numpy(table.column("difficulty").to_numpy().copy()),
        }

    def load_all(self) -> dict[str, torch.Tensor]:
        parts = [self.read_shard(e) for e in self.manifest["shards"]]
        return {k: torch.cat([p[k] for p in parts]) for k in ("images", "labels", "difficulty")}

    def iter_batches(
        self, batch_size: int, seed: int, shuffle: bool = True
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Stream (images, labels) batches shard by shard (seeded shard order and within-shard shuffling)."""
        cursor = ShardCursor(self, batch_size, seed, shuffle)
        while (batch := cursor.next_batch()) is not None:
            yield batch


class ShardCursor:
    """One seeded pass over a :class:`ShardSet` (``iter_batches``) as an object whose position can be saved:
    ``state_dict()`` holds the generator, the shard order, the current shard's row order and the next row, so
    a restored cursor (which re-reads and re-verifies the current shard) continues exactly where it was."""

    def __init__(self, shards: ShardSet, batch_size: int, seed: int, shuffle: bool = True):
        self.shards, self.batch_size, self.shuffle = shards, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        n = len(shards.manifest["shards"])
        self.order = torch.randperm(n, generator=self.gen).tolist() if shuffle else list(range(n))
        self.shard = 0  # index into ``order``
        self.part: dict[str, torch.Tensor] | None = None  # the current shard, read when it is due
        self.rows: torch.Tensor | None = None
        self.pos = 0

    def _read(self) -> dict[str, torch.Tensor]:
        return self.shards.read_shard(self.shards.manifest["shards"][self.order[self.shard]])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next (images, labels) batch of the pass (the last of a shard may be short); None at its end."""
        while self.shard < len(self.order):
            if self.part is None:
                self.part = self._read()
                n = len(self.part["labels"])
                self.rows = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
                self.pos = 0
            if self.pos < len(self.rows):
                j = self.rows[self.pos : self.pos + self.batch_size]
                self.pos += self.batch_size
                return self.part["images"][j], self.part["labels"][j]
            self.part, self.rows = None, None
            self.shard += 1
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "order": list(self.order), "shard": self.shard,
                "rows": self.rows, "pos": self.pos}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.shard = list(state["order"]), int(state["shard"])
        self.rows, self.pos = state["rows"], int(state["pos"])
        self.part = self._read() if self.rows is not None else None
