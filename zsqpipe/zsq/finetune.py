"""The fine-tuning loop shared by the zero-shot methods, and the streaming batches of synthetic samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zsqpipe.config import AUGMENTS
from zsqpipe.data.loaders import random_crop_flip
from zsqpipe.data.shards import ShardCursor, ShardSet
from zsqpipe.engine import make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import QuantContext
from zsqpipe.progress import progress
from zsqpipe.zsq.augment import random_resized_crop_flip


class SyntheticBatches:
    """Endless (images, labels) batches streamed shard by shard from verified Parquet shards.

    Each pass reshuffles (seed + pass); ``augment`` applies random crop (zero padding) + horizontal flip, the
    small-image counterpart of IntraQ/HAST's ``RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip``.
    Ragged shard tails are dropped. ``state_dict()`` saves the exact position (pass, shard cursor, augmentation
    generator), so a restored stream continues with the very batches the original would have produced.
    """

    def __init__(self, shards: ShardSet, batch_size: int, seed: int, device, augment=True, padding=None):
        largest = max(e["rows"] for e in shards.manifest["shards"])
        if batch_size > largest:
            raise ConfigError(f"batch_size {batch_size} exceeds the largest sample shard ({largest} samples)")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.device, self.augment = device, augment
        self.pad = padding if padding is not None else max(2, shards.shape[-1] // 8)
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0  # passes completed
        self.cursor: ShardCursor | None = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self.cursor is None:
                self.cursor = ShardCursor(self.shards, self.batch_size, seed=self.seed + self.epoch)
            batch = self.cursor.next_batch()
            if batch is None:
                self.cursor = None
                self.epoch += 1
                continue
            x, y = batch
            if len(y) < self.batch_size:  # keep batch statistics comparable: drop the ragged tail
                continue
            if self.augment:
                x = random_crop_flip(x, self.pad, True, self.gen)
            return x.to(self.device).contiguous(memory_format=torch.channels_last), y.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "epoch": self.epoch,
                "cursor": None if self.cursor is None else self.cursor.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.epoch = int(state["epoch"])
        self.cursor = None
        if state["cursor"] is not None:
            self.cursor = ShardCursor(self.shards, self.batch_size, seed=self.seed + self.epoch)
            self.cursor.load_state_dict(state["cursor"])




def check_augment(cfg, name: str) -> None:
    if cfg.augment not in AUGMENTS:
        raise ConfigError(f"methods.{name}.augment: expected one of {list(AUGMENTS)}, got {cfg.augment!r}")
    if not 0.0 < cfg.aug_margin <= 1.0:
        raise ConfigError(f"methods.{name}.aug_margin: expected a value in (0, 1], got {cfg.aug_margin}")


class ShardStream:
    """Endless (images, labels) batches of ``ctx.samples`` with the chosen augmentation.

    ``SyntheticBatches`` drops ragged batches, so the batch is capped at the largest shard (with a warning)
    rather than waiting forever for a full one. ``state_dict()`` saves the exact position (resumable runs).
    """

    def __init__(
        self, ctx: QuantContext, batch_size: int, seed: int, augment: str = "none", aug_margin: float = 0.5
    ):
        if ctx.samples is None:
            raise ConfigError("this method trains on synthetic shards, but the context has no samples")
        largest = max(int(e["rows"]) for e in ctx.samples.manifest["shards"])
        if batch_size > largest:
            ctx.log(f"warning: batch {batch_size} > {largest} samples per shard; using batches of {largest}")
            batch_size = largest
        self.batches = SyntheticBatches(
            ctx.samples, batch_size, seed, ctx.device, augment=augment == "crop_flip"
        )
        self.rrc = augment == "rrc"
        self.scale = (aug_margin, 1.0)
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.batches)
        if not self.rrc:
            return x, y
        x = random_resized_crop_flip(x, self.scale, self.gen)
        return x.contiguous(memory_format=torch.channels_last), y

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.gen.set_state(state["gen"])


def finetune(
    ctx: QuantContext, cfg, step: Callable[[int], torch.Tensor], params=None, stateful: dict | None = None
) -> None:
    """``cfg.epochs`` x ``cfg.iters_per_epoch`` optimizer steps on ``step(iteration) -> loss``; evaluates after
    every epoch through ``ctx.end_epoch``. ``cfg`` provides optimizer, lr, momentum, nesterov, weight_decay,
    schedule and milestones (the GDFQ-family student optimiser: SGD, Nesterov, momentum 0.9). ``stateful``:
    the objects ``step`` draws on (e.g. its batch stream), checkpointed with the loop (``ctx.resumable``)."""
    params = list(ctx.student.parameters()) if params is None else params
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * cfg.iters_per_epoch, milestones=cfg.milestones)
    start = ctx.resumable(optimizer=opt, scheduler=sched, **(stateful or {}))
    it = start * cfg.iters_per_epoch
    for epoch in range(start, cfg.epochs):
        total = 0.0
        for _ in progress(range(cfg.iters_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}"):
            loss = step(it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            it += 1
        ctx.end_epoch(epoch, {"train_loss": total / cfg.iters_per_epoch, "lr": opt.param_groups[0]["lr"]})
