"""The fine-tuning loop shared by the zero-shot methods, and the streaming batches of synthetic samples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zsqpipe.data.loaders import random_crop_flip
from zsqpipe.data.shards import ShardCursor, ShardSet
from zsqpipe.engine import make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import QuantContext
from zsqpipe.progress import progress


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
