"""Wall-time measurement shared by the deploy stage (``deploy-latency``) and ``benchmarks/``: timed calls after
untimed warm-up calls, CUDA-synchronised on a CUDA device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def step_times(step: Callable[[int], object], iters: int, warmup: int, device: torch.device | None = None) -> list[float]:
    """Seconds of each of ``iters`` calls ``step(i)`` after ``warmup`` untimed ones (CUDA synchronised)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def median_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup`` calls."""
    return 1000.0 * statistics.median(step_times(lambda _i: fn(), runs, warmup))
