"""The fine-tuning loop shared by the zero-shot methods, and the streaming batches of synthetic samples."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from zsqpipe.data.loaders import random_crop_flip
from zsqpipe.data.shards import ShardSet
from zsqpipe.engine import make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import QuantContext


def synthetic_batches(
    shards: ShardSet, batch_size: int, seed: int, device, augment: bool = True, padding: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches streamed shard by shard from verified Parquet shards.

    Each pass reshuffles (seed + pass); ``augment`` applies random crop (zero padding) + horizontal flip, the
    small-image counterpart of IntraQ/HAST's ``RandomResizedCrop(scale=(0.5, 1)) + RandomHorizontalFlip``.
    """
    gen = torch.Generator().manual_seed(seed)
    pad = padding if padding is not None else max(2, shards.shape[-1] // 8)
    largest = max(e["rows"] for e in shards.manifest["shards"])
    if batch_size > largest:
        raise ConfigError(f"batch_size {batch_size} exceeds the largest sample shard ({largest} samples)")
    epoch = 0
    while True:
        for x, y in shards.iter_batches(batch_size, seed=seed + epoch):
            if len(y) < batch_size:  # keep batch statistics comparable: drop the ragged tail
                continue
            if augment:
                x = random_crop_flip(x, pad, True, gen)
            yield x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
        epoch += 1


def finetune(ctx: QuantContext, cfg, step: Callable[[int], torch.Tensor], params=None) -> None:
    """``cfg.epochs`` x ``cfg.iters_per_epoch`` optimizer steps on ``step(iteration) -> loss``; evaluates after
    every epoch through ``ctx.end_epoch``. ``cfg`` provides optimizer, lr, momentum, nesterov, weight_decay,
    schedule and milestones (the GDFQ-family student optimiser: SGD, Nesterov, momentum 0.9)."""
    params = list(ctx.student.parameters()) if params is None else params
    opt = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * cfg.iters_per_epoch, milestones=cfg.milestones)
    it = 0
    for epoch in range(cfg.epochs):
        total = 0.0
        for _ in range(cfg.iters_per_epoch):
            loss = step(it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            it += 1
        ctx.end_epoch(epoch, {"train_loss": total / cfg.iters_per_epoch, "lr": opt.param_groups[0]["lr"]})
