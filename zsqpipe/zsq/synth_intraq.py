"""Synthesizer ``intraq``: IntraQ's synthetic images with intra-class heterogeneity (Zhong et al., CVPR 2022:
local object reinforcement, marginal distance constraint, soft inception loss), following the official
``zysxmu/IntraQ: data_generate/distill_data.py`` (``getDistilData_hardsample_cosineDistanceEMA_interClass_aug``)
as described in the reference note §2.3.

Each batch: x ~ N(0, 1), labels y uniform, a soft target t_i per sample (t_i ~ U[target_pro, 1] with
probability 0.5, else 1), then ``iters`` Adam steps (lr 0.5, ReduceLROnPlateau) on

    L = (1/L) sum_l [MSE(mu_l, mu_l^BN) + MSE(var_l, var_l^BN)]            (batch BN statistics)
      + mean_i (softmax(T(x'))_{i, y_i} - t_i)^2                           (L_target, soft inception loss)
      + sum_i m_i relu(eps_l - d_i) / (sum_i m_i + 1e-6)                   (L_cos_lower)
      + sum_i m_i relu(d_i - eps_u) / (sum_i m_i + 1e-6)                   (L_cos_upper)

with d_i = 1 - cos(f_i, fbar_{y_i}), f_i the teacher feature feeding the classifier (the input of the last
``nn.Linear``; ResNet-20: ``features.final_pool``), fbar_c the mean feature of class c over all previously
generated batches (m_i = 0 while class y_i has none), and x' = RHF(RRC(x, scale=(aug_margin, 1))) with
probability ``aug_prob`` per step, else x (local object reinforcement; ``zsqpipe.zsq.augment``).
After each batch its (un-augmented) features join the class means. The shards' labels are the sampled y.

Dataset settings (``run_generate_*.sh``): CIFAR-10 target_pro 0.95, eps_l 0.05, eps_u 0.8 (the defaults);
CIFAR-100 0.6 / 0.02 / 1.0; ImageNet 1 / 0.0 / 2 (cosine terms inactive, hard targets); aug_margin 0.5.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import NonNegFloat, NonNegInt, PosFloat, PosInt, Prob, Range
from zsqpipe.errors import ConfigError
from zsqpipe.zsq.augment import random_resized_crop_flip
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


@dataclass(frozen=True)
class IntraQSynthConfig:
    num_samples: PosInt = 512  # official: 4 groups x 5 batches x 256 = 5,120
    batch_size: PosInt = 256
    iters: PosInt = 200  # official: 1,000 (the cap when stop_drop > 0)
    stop_drop: StopDrop = 0.0  # official: 0 (fixed iterations)
    keep_best: KeepBest = False  # official: False (the last pixels)
    lr: PosFloat = 0.5
    patience: NonNegInt = 10  # ReduceLROnPlateau patience; official: 50 (of 1,000 iterations), 5 % of iters
    min_lr: NonNegFloat = 1e-4
    target_pro: Prob = 0.95  # CIFAR-10; CIFAR-100 0.6, ImageNet 1.0
    eps_lower: NonNegFloat = 0.05  # CIFAR-10; CIFAR-100 0.02, ImageNet 0.0
    eps_upper: NonNegFloat = 0.8  # CIFAR-10; CIFAR-100 1.0, ImageNet 2.0
    aug_prob: Prob = 0.5  # probability per step of optimising through RRC + flip
    aug_margin: Annotated[float, Range(gt=0, le=1)] = 0.5  # RandomResizedCrop scale lower bound (augMargin)
    soft_prob: Prob = 0.5  # fraction of samples with a soft target t ~ U[target_pro, 1]
    shard_size: PosInt = 1024


def soft_targets(n: int, target_pro: float, soft_prob: float, gen: torch.Generator) -> torch.Tensor:
    """Target probability per sample: U[target_pro, 1] with probability ``soft_prob``, else 1."""
    soft = torch.rand(n, generator=gen) < soft_prob
    u = torch.empty(n).uniform_(target_pro, 1.0, generator=gen)
    return torch.where(soft, u, torch.ones(n))


def target_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_target = mean_i (softmax(logits)_{i, y_i} - t_i)^2 (squared error on the target class only)."""
    p = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    return ((p - targets) ** 2).mean()


def cosine_margin_losses(
    features: torch.Tensor, centers: torch.Tensor, mask: torch.Tensor, eps_lower: float, eps_upper: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cos_lower, L_cos_upper): keep d = 1 - cos(f, fbar_y) within [eps_lower, eps_upper] (masked mean)."""
    d = 1.0 - F.cosine_similarity(features, centers, dim=1, eps=1e-6)
    denom = mask.sum() + 1e-6
    lower = (F.relu(eps_lower - d) * mask).sum() / denom
    upper = (F.relu(d - eps_upper) * mask).sum() / denom
    return lower, upper


def classifier_input_hook(model: nn.Module):
    """Forward pre-hook on the last ``nn.Linear`` of ``model``; returns (store, handle), store["f"] = input."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("intraq: the teacher has no nn.Linear classifier to take features from")
    store: dict[str, torch.Tensor] = {}

    def hook(_module, inp):
        store["f"] = inp[0].flatten(1)

    return store, linears[-1].register_forward_pre_hook(hook)


def make_loss(teacher, stats, store, cfg, gen, y, t, centers, mask, parts: dict):
    """The per-step IntraQ loss of one batch (records the BN and target terms in ``parts``)."""

    def loss_fn(x: torch.Tensor, _step: int) -> torch.Tensor:
        aug = float(torch.rand(1, generator=gen)) < cfg.aug_prob
        xin = random_resized_crop_flip(x, (cfg.aug_margin, 1.0), gen) if aug else x
        logits = teacher(xin)
        bn = stats.batch_loss()
        tgt = target_loss(logits, y, t)
        loss = bn + tgt
        if centers is not None:
            lower, upper = cosine_margin_losses(store["f"], centers, mask, cfg.eps_lower, cfg.eps_upper)
            loss = loss + lower + upper
        parts.update(bn=float(bn.detach()), target=float(tgt.detach()))
        return loss

    return loss_fn


@register_synthesizer("intraq", IntraQSynthConfig)
def synthesize_intraq(teacher: nn.Module, cfg: IntraQSynthConfig, ctx: SynthContext):
    check_common(cfg, "intraq")
    if not 0.0 <= cfg.target_pro <= 1.0 or not 0.0 < cfg.aug_margin <= 1.0:
        raise ConfigError("synthesis.intraq: target_pro must lie in [0, 1] and aug_margin in (0, 1]")
    teacher.eval()
    dev, gen, num_classes = ctx.device, ctx.generator, ctx.num_classes
    stats = BNStatistics(teacher)
    store, handle = classifier_input_hook(teacher)
    bank_sum: torch.Tensor | None = None  # (num_classes, D) sum of features of earlier batches
    bank_count = torch.zeros(num_classes, device=dev)
    images, labels = [], []
    try:
        for b, n in enumerate(batch_sizes(cfg.num_samples, cfg.batch_size)):
            start = time.perf_counter()
            x0 = torch.randn((n, *ctx.shape), generator=gen).to(dev)
            y = torch.randint(0, num_classes, (n,), generator=gen).to(dev)
            t = soft_targets(n, cfg.target_pro, cfg.soft_prob, gen).to(dev)
            if bank_sum is None:
                centers, mask = None, torch.zeros(n, device=dev)
            else:
                centers = bank_sum[y] / bank_count[y].clamp(min=1)[:, None]
                mask = (bank_count[y] > 0).float()
            parts: dict[str, float] = {}
            loss_fn = make_loss(teacher, stats, store, cfg, gen, y, t, centers, mask, parts)
            ctx.bn_traces.append([])
            x, last, steps = optimise_pixels(x0, loss_fn, cfg.iters, cfg.lr, cfg.patience, cfg.min_lr,
                                              trace=ctx.bn_traces[-1], trace_value=lambda p=parts: p["bn"],
                                              stop_drop=cfg.stop_drop, keep_best=cfg.keep_best)  # fmt: skip
            ctx.steps.append(steps)
            with torch.no_grad():
                logits = teacher(x)
                feats = store["f"].detach()
            if bank_sum is None:
                bank_sum = torch.zeros(num_classes, feats.shape[1], device=dev, dtype=feats.dtype)
            bank_sum.index_add_(0, y, feats)
            bank_count.index_add_(0, y, torch.ones(n, device=dev))
            images.append(x.cpu())
            labels.append(y.cpu())
            acc = float((logits.argmax(1) == y).float().mean())
            ctx.log(
                f"intraq batch {b}: {n} images, {steps} steps, loss {last:.4f} (bn {parts['bn']:.4f}, "
                f"target {parts['target']:.4f}), teacher agrees on {100 * acc:.1f}%, "
                f"{int(mask.sum())} with a class centre, {time.perf_counter() - start:.1f}s"
            )
    finally:
        stats.remove()
        handle.remove()
    return torch.cat(images), torch.cat(labels)
