"""A generator warm-up recorded once and replayed by every cell that needs it (``zsqpipe/warmups.py`` says
which warm-ups these are and which settings determine them).

The record holds every batch the generator produced, in order (images and targets), its loss per step, and,
for GDFQ/Qimera, the generator, its optimizer, its LR scheduler and its ``torch.Generator`` after the last
warm-up step. Replaying the batches through a student with range updates on, then loading that state, leaves
the cell exactly where training the generator inside the cell would (tests/test_warmup.py). The generator's
initial weights come from the global RNG, as when the cell trains it itself: the record keeps the RNG state
before and after the generator was built, the cell checks that its own state is the same before it would
build it (:func:`check_init_rng`) and continues from the state after, so no later random draw changes either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zsqpipe.config import canonical_json
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import load_checkpoint, save_checkpoint
from zsqpipe.resume import plain_state

FORMAT = "zsqpipe.generator_warmup/1"


def check_init_rng(record: WarmupRecord, what: str) -> None:
    """The cell is about to build the generator the record was trained from: its global RNG must be where the
    ``generator_warmup`` job's was, so that both draw the same initial weights (the stages set up the RNG
    alike: seed, then the FP model; tests/test_warmup.py)."""
    if not torch.equal(torch.get_rng_state(), record.init_rng):
        raise IntegrityError(
            f"{what}: the global RNG differs from the one the warm-up's generator was initialised from (the "
            "quantize and generator-warmup stages must seed and build the FP model alike); run without --warmup"
        )


@dataclass
class WarmupRecord:
    """The batches of one generator warm-up (``images``: steps x B x C x H x W, ``targets``: steps x B class
    indices or steps x B x C soft targets, ``g_loss``: steps) and the generator's final ``state`` (or None)."""

    spec: dict[str, Any]
    seed: int
    fp_checkpoint_sha256: str
    images: torch.Tensor
    targets: torch.Tensor
    g_loss: torch.Tensor
    state: dict[str, Any] | None = None
    init_rng: torch.Tensor | None = None  # global CPU RNG state right before the generator was built ...
    after_init_rng: torch.Tensor | None = None  # ... and right after
    wall_time_s: float = 0.0
    # False: the record was made for another seed than the cell's (quantize --inputs-seed): the replay leaves the
    # cell's global RNG as it is, and a GDFQ/Qimera generator draws its noise from the cell's seed after it
    adopt_rng: bool = True

    @property
    def steps(self) -> int:
        return int(self.images.shape[0])

    def batch(self, step: int, device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Step ``step``'s (images, targets, generator loss), images channels_last as the cells use them."""
        x = self.images[step].to(device).contiguous(memory_format=torch.channels_last)
        return x, self.targets[step].to(device), float(self.g_loss[step])

    def save(self, path: str | Path) -> None:
        fields = {k: v for k, v in self.__dict__.items() if k != "adopt_rng"}  # how a cell replays it, not data
        save_checkpoint(path, plain_state({"format": FORMAT, **fields}))

    @classmethod
    def load(cls, path: str | Path, spec: dict[str, Any], fp_sha256: str, seed: int) -> WarmupRecord:
        """Read a record and check it was made for this warm-up: same settings (one line naming the first
        difference), same FP checkpoint, same seed (the cell's, or the one ``quantize --inputs-seed`` names)."""
        obj = load_checkpoint(path)
        if obj.pop("format", None) != FORMAT:
            raise IntegrityError(f"{path}: not a generator warm-up (expected format {FORMAT})")
        rec = cls(**obj)
        if canonical_json(rec.spec) != canonical_json(spec):
            diff = sorted(k for k in {*rec.spec, *spec} if rec.spec.get(k) != spec.get(k))
            key = diff[0] if diff else "?"
            raise ConfigError(
                f"{path}: warm-up recorded with {key}={rec.spec.get(key)!r}, the method's config gives "
                f"{key}={spec.get(key)!r}; pass the warm-up made for these settings"
            )
        if rec.fp_checkpoint_sha256 != fp_sha256:
            raise IntegrityError(f"{path}: warm-up was recorded on a different FP checkpoint")
        if rec.seed != seed:
            raise IntegrityError(f"{path}: warm-up was recorded for seed {rec.seed}, expected {seed} (the cell's "
                                 "seed, or --inputs-seed / --warmup-seed)")
        return rec


class WarmupRecorder:
    """Collects a warm-up's batches step by step (kept on the CPU)."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.init_rng: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def generator_init(self) -> Iterator[None]:
        """Wrap the generator's construction: records the global RNG state before and after it."""
        before = torch.get_rng_state()
        yield
        self.init_rng = (before, torch.get_rng_state())

    def add(self, x: torch.Tensor, target: torch.Tensor, g_loss: float) -> None:
        self.images.append(x.detach().to("cpu", memory_format=torch.contiguous_format))
        self.targets.append(target.detach().cpu())
        self.losses.append(float(g_loss))

    def record(self, spec: dict, seed: int, fp_sha256: str, state: dict | None = None) -> WarmupRecord:
        if self.init_rng is None:
            raise RuntimeError("WarmupRecorder: the generator was not built inside generator_init()")
        return WarmupRecord(spec=spec, seed=seed, fp_checkpoint_sha256=fp_sha256, images=torch.stack(self.images),
                            targets=torch.stack(self.targets), g_loss=torch.tensor(self.losses, dtype=torch.float64),
                            state=state, init_rng=self.init_rng[0], after_init_rng=self.init_rng[1])  # fmt: skip
