"""Shared timing helpers of the benchmarks (run as scripts, so they import this as a top-level module)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def step_times(step: Callable[[int], None], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``iters`` calls ``step(i)`` after ``warmup`` untimed ones (CUDA synchronised)."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def sgd_step(model, x, y, opt, before: Callable[[int], None] | None = None,
             after: Callable[[], None] | None = None) -> Callable[[int], None]:  # fmt: skip
    """One training step on a fixed batch: cross-entropy, backward, ``opt.step()``; ``before(i)`` runs first
    (e.g. ``set_active_subnet``) and ``after()`` last (e.g. a gradient-interval update), both timed."""

    def step(i: int) -> None:
        if before is not None:
            before(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()

    return step
