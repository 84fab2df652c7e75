"""Synthesizer ``zeroq``: ZeroQ's distilled data (Cai et al., CVPR 2020, Eq. 2 / Algorithm 1), following the
official ``amirgholami/ZeroQ: classification/distill_data.py`` (``getDistilData``) as described in the
reference note §2.6.

For every batch, the pixels x are optimised with Adam (lr 0.5) and ``ReduceLROnPlateau`` on

    L(x) = sum_l (1/B) sum_b [ ||mu_lb(x) - mu_l^BN||^2 + ||sigma_lb(x) - sigma_l^BN||^2 ]     (BN layers)
         + input_weight * (1/B) sum_b [ ||mu_b(x)||^2 + ||sigma_b(x) - 1||^2 ]                (input level)

where mu_lb / sigma_lb are the *per-image* channel mean / std of the input of BN layer l (the output of the
conv before it; ``BNStatistics.per_sample_loss``) and the input-level term pulls every image's per-channel
statistics to N(0, 1), as the official code does. No labels, no cross-entropy. The shards' labels are the
teacher's argmax on the final images.

Options (docs/methods/zeroq.md):
- ``init``: ``gaussian`` (default; the paper's Algorithm 1 draws N(0, 1)), ``uniform`` (the official
  ``UniformDataset`` distribution, U{0..254} - 127.5, scaled to the unit variance its docstring promises) or
  ``zeroq_uniform`` (faithful to the code: divided by the *variance* 5418.75 instead of its square root, so
  values lie in about +-0.024; ZeroQ issue #20).
- ``input_weight``: 1 = the official input-level term; 0 switches it off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from zsqpipe.config import Doc, NonNegFloat, NonNegInt, OneOf, PosFloat, PosInt
from zsqpipe.errors import ConfigError
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.synthesis import (
    KeepBest,
    StopDrop,
    SynthContext,
    batch_sizes,
    check_common,
    optimise_pixels,
    register_synthesizer,
)

ZEROQ_INITS = ("gaussian", "uniform", "zeroq_uniform")
UNIFORM_VARIANCE = 5418.75  # var of U(-128, 127) = 255^2 / 12, the constant in ZeroQ's UniformDataset


@dataclass(frozen=True)
class ZeroQSynthConfig:
    num_samples: PosInt = 512  # official: 1 batch of 64 (run.sh); IntraQ's re-implementation: 5,120
    batch_size: PosInt = 256
    iters: PosInt = 100  # official: 500 (the cap when stop_drop > 0)
    stop_drop: StopDrop = 0.0  # official: 0 (fixed iterations)
    keep_best: KeepBest = False  # official: False (the last pixels)
    lr: PosFloat = 0.5
    patience: NonNegInt = 20  # ReduceLROnPlateau patience; official: 100 (of 500 iterations)
    min_lr: NonNegFloat = 1e-4
    # gaussian | uniform | zeroq_uniform (official code, values ~ +-0.024)
    init: Annotated[
        str, OneOf(*ZEROQ_INITS), Doc("zeroq_uniform = official init (divides by the variance)")
    ] = "gaussian"
    input_weight: NonNegFloat = 1.0  # weight of the input-level N(0, 1) term (official: 1)
    eps: NonNegFloat = 1e-6  # the official eps inside the input-level std
    shard_size: PosInt = 1024


def initial_images(init: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Starting pixels: N(0, 1), or ZeroQ's discrete uniform scaled by 1/std (``uniform``) or 1/var."""
    if init == "gaussian":
        return torch.randn(shape, generator=gen)
    if init in ("uniform", "zeroq_uniform"):
        u = torch.randint(0, 255, shape, generator=gen).float() - 127.5
        return u / (math.sqrt(UNIFORM_VARIANCE) if init == "uniform" else UNIFORM_VARIANCE)
    raise ConfigError(f"synthesis.zeroq.init: expected one of {list(ZEROQ_INITS)}, got {init!r}")


def input_stats_loss(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ZeroQ's input-level term: (1/B) sum_b ||mu_b||^2 + ||sigma_b - 1||^2 over per-image channel stats.

    Biased variance over (H, W), like ``BNStatistics.per_sample_loss`` (the official code uses torch.var's
    unbiased estimate; the difference is a factor H*W / (H*W - 1) inside the square root).
    """
    mean = x.mean(dim=(2, 3))
    std = x.var(dim=(2, 3), unbiased=False).add(eps).sqrt()
    return (mean**2).sum(1).mean() + ((std - 1.0) ** 2).sum(1).mean()


@register_synthesizer("zeroq", ZeroQSynthConfig)
def synthesize_zeroq(teacher: nn.Module, cfg: ZeroQSynthConfig, ctx: SynthContext):
    check_common(cfg, "zeroq")
    if cfg.init not in ZEROQ_INITS:
        raise ConfigError(f"synthesis.zeroq.init: expected one of {list(ZEROQ_INITS)}, got {cfg.init!r}")
    teacher.eval()
    stats = BNStatistics(teacher)
    images, labels = [], []
    try:
        for b, n in enumerate(batch_sizes(cfg.num_samples, cfg.batch_size)):
            start = time.perf_counter()
            x0 = initial_images(cfg.init, (n, *ctx.shape), ctx.generator).to(ctx.device)

            def loss_fn(x: torch.Tensor, _step: int) -> torch.Tensor:
                teacher(x)
                loss = stats.per_sample_loss()
                if cfg.input_weight:
                    loss = loss + cfg.input_weight * input_stats_loss(x, cfg.eps)
                return loss

            ctx.bn_traces.append([])  # ZeroQ's loss is the BN-statistics loss (+ the optional input term)
            x, last, steps = optimise_pixels(x0, loss_fn, cfg.iters, cfg.lr, cfg.patience, cfg.min_lr,
                                              trace=ctx.bn_traces[-1], stop_drop=cfg.stop_drop,
                                              keep_best=cfg.keep_best)  # fmt: skip
            ctx.steps.append(steps)
            with torch.no_grad():
                y = teacher(x).argmax(1)
            images.append(x.cpu())
            labels.append(y.cpu())
            ctx.log(
                f"zeroq batch {b}: {n} images, {steps} steps, loss {last:.4f}, "
                f"{len(y.unique())} classes, {time.perf_counter() - start:.1f}s"
            )
    finally:
        stats.remove()
    return torch.cat(images), torch.cat(labels)
