"""``hast``: hard-sample synthesis (HAST, Li et al., CVPR 2023, the hard-sample-enhanced inception loss L_HIL).

Follows the official ``data_generate/distill_data.py: getDistilData_hardsample`` as described in the reference
note (``shared/reference/zero-shot-quantization.md`` §2.4): per batch, x ~ N(0, 1) with uniform random labels y
is optimised with Adam (lr 0.5) + ``ReduceLROnPlateau`` on

    L = beta * mean_i[(1 - p_i)^gamma * CE(T(x_i), y_i)]
        + (1/L) sum_l MSE(mu_l(x), mu_l^BN) + (1/L) sum_l MSE(var_l(x), var_l^BN)

with p_i = softmax(T(x_i))_{y_i} **not detached** (the gradient flows through the difficulty weight, a focal
loss), batch statistics at BN inputs over (N, H, W) with biased variance (``BNStatistics.batch_loss``), and the
BN term unweighted. beta = 10, gamma = 2 on CIFAR; 0.1 / 0.5 on ImageNet. ``hard_sample = False`` is the
ablation without hard-sample synthesis: plain CE (gamma = 0, beta kept). No augmentation (the official CIFAR
setting; the ImageNet per-step RandomResizedCrop is not implemented). See docs/methods/hast.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import NonNegFloat, NonNegInt, PosFloat, PosInt
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.synthesis import KeepBest, StopDrop, SynthContext, optimise_pixels, register_synthesizer


@dataclass(frozen=True)
class HASTSynthConfig:
    num_samples: PosInt = 512  # official: 4 groups x 5 batches x 256 = 5120
    batch_size: PosInt = 256  # official: 256
    iters: NonNegInt = 200  # official: 1000 Adam steps per batch (the cap when stop_drop > 0)
    stop_drop: StopDrop = 0.0  # official: 0 (fixed iterations)
    keep_best: KeepBest = False  # official: False (the last pixels)
    lr: PosFloat = 0.5  # official: 0.5
    patience: NonNegInt = 10  # official: 50 (of 1000 steps); 5 % of iters, as the official
    min_lr: NonNegFloat = 1e-4  # official: 1e-4
    beta: NonNegFloat = 10.0  # weight of the difficulty-weighted CE; CIFAR 10, ImageNet 0.1
    gamma: NonNegFloat = 2.0  # difficulty exponent; CIFAR 2, ImageNet 0.5
    hard_sample: bool = True  # False: ablation without hard samples, plain CE (gamma = 0)
    shard_size: PosInt = 1024


def hard_sample_ce(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean_i[(1 - p_i)^gamma * CE_i] with p_i = softmax(logits_i)[labels_i], gradient through p (not detached).

    ``1 - p`` is clamped at 1e-12 so that gamma < 1 (ImageNet: 0.5) gives no NaN gradient when p rounds to 1.
    """
    log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    ce = -log_p
    if gamma == 0:
        return ce.mean()
    weight = (1.0 - log_p.exp()).clamp_min(1e-12).pow(gamma)
    return (weight * ce).mean()


def hast_synthesis_loss(
    teacher: nn.Module, bn_stats: BNStatistics, x: torch.Tensor, labels: torch.Tensor, cfg: HASTSynthConfig,
    parts: dict[str, float] | None = None,
) -> torch.Tensor:  # fmt: skip
    """L_HIL = beta * hard-sample CE + BN mean/var loss for one forward of ``teacher`` on ``x`` (``parts``: the
    BN term's value is recorded under "bn")."""
    gamma = cfg.gamma if cfg.hard_sample else 0.0
    logits = teacher(x)
    bn = bn_stats.batch_loss()
    if parts is not None:
        parts["bn"] = float(bn.detach())
    return cfg.beta * hard_sample_ce(logits, labels, gamma) + bn


@register_synthesizer("hast", HASTSynthConfig)
def synthesize_hast(teacher: nn.Module, cfg: HASTSynthConfig, ctx: SynthContext):
    """Optimise ``cfg.num_samples`` images in batches of ``cfg.batch_size``; returns (images, labels) on CPU."""
    if cfg.num_samples < 1 or cfg.batch_size < 1 or cfg.iters < 0:
        raise ValueError("synthesis.hast: num_samples and batch_size must be >= 1, iters >= 0")
    teacher = teacher.eval().to(memory_format=torch.channels_last)  # ~1.5-2x faster on CPU (in place)
    bn_stats = BNStatistics(teacher)
    images, labels = [], []
    try:
        n_batches = -(-cfg.num_samples // cfg.batch_size)
        for b in range(n_batches):
            size = min(cfg.batch_size, cfg.num_samples - b * cfg.batch_size)
            y_cpu = torch.randint(0, ctx.num_classes, (size,), generator=ctx.generator)
            x0 = torch.randn(size, *ctx.shape, generator=ctx.generator).to(ctx.device)
            x0 = x0.contiguous(memory_format=torch.channels_last)
            y = y_cpu.to(ctx.device)

            parts: dict[str, float] = {}

            def loss_fn(x, _step, y=y, parts=parts):
                return hast_synthesis_loss(teacher, bn_stats, x, y, cfg, parts)

            ctx.bn_traces.append([])
            x, _, steps = optimise_pixels(x0, loss_fn, cfg.iters, cfg.lr, cfg.patience, cfg.min_lr,
                                          trace=ctx.bn_traces[-1], trace_value=lambda parts=parts: parts["bn"],
                                          stop_drop=cfg.stop_drop, keep_best=cfg.keep_best)  # fmt: skip
            ctx.steps.append(steps)
            with torch.no_grad():
                final = float(loss_fn(x, steps))
                p = teacher(x).softmax(1).gather(1, y[:, None]).mean()
            ctx.log(
                f"hast: batch {b + 1}/{n_batches} ({size} images, {steps} steps): loss {final:.4f}, mean p_teacher {p:.3f}"
            )
            images.append(x.cpu())
            labels.append(y_cpu)
    finally:
        bn_stats.remove()
    return torch.cat(images), torch.cat(labels)
