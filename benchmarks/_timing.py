"""Shared timing helpers of the benchmarks (run as scripts, so they import this as a top-level module)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zsqpipe.timing import step_times  # noqa: F401  (re-exported for the step benchmarks)


def parse_bench_args(doc: str, batch: int, iters: int, warmup: int, threads: int, extra=None):
    """The options every step benchmark takes (--batch --iters --warmup --threads --bits --device, plus
    ``extra(parser)``'s); sets torch's threads and seed 0. Returns (args, device)."""
    from zsqpipe.engine import resolve_device

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--device", default="auto")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args, resolve_device(args.device)


def median_time(fn: Callable[[], None], reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_step_by_difference(run: Callable[[int], None], k1: int, k2: int, warmup: bool = False) -> float:
    """Seconds per step as (t(k2) - t(k1)) / (k2 - k1), t(k) the time of ``run(k)`` (k steps): fixed costs
    inside ``run`` (set-up, final scoring) cancel. ``warmup``: one untimed ``run(k1)`` first (lazy imports,
    first-call allocations)."""
    if warmup:
        run(k1)
    times = []
    for k in (k1, k2):
        t = time.perf_counter()
        run(k)
        times.append(time.perf_counter() - t)
    return (times[1] - times[0]) / (k2 - k1)


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
