"""Data-free sample synthesis by optimising inputs against a frozen FP teacher (noise optimisation).

A synthesizer is registered with ``@register_synthesizer(name, ConfigDataclass)`` and called as
``fn(teacher, cfg, ctx) -> (images, labels)``; the ``synthesize`` stage then scores every sample's difficulty
1 - p_teacher(label) and writes shards. Synthesizers see only the teacher, the input shape and the number of
classes: the stage runs them under :func:`zsqpipe.data.forbid_real_data`.

Shared optimisation loop (ZeroQ ``distill_data.py``, IntraQ/HAST ``data_generate/distill_data.py``): for each
batch, x ~ N(0, 1) (or ZeroQ's uniform init) is optimised with Adam and ``ReduceLROnPlateau`` on the total
loss for ``iters`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.names import SYNTHESIZER_NAMES
from zsqpipe.progress import progress
from zsqpipe.registry import Registry

SYNTHESIZERS: Registry[tuple[Callable, type]] = Registry(
    "synthesizer", declared=SYNTHESIZER_NAMES, module="zsqpipe.zsq.synth_{}"
)


def register_synthesizer(name: str, config_cls: type):
    """Register ``fn(teacher, cfg, ctx) -> (images, labels)`` with its config dataclass."""
    return SYNTHESIZERS.register(name, wrap=lambda _key, fn: (fn, config_cls))


def get_synthesizer(name: str) -> tuple[Callable, type]:
    return SYNTHESIZERS.get(name)


@dataclass
class SynthContext:
    num_classes: int
    shape: tuple[int, ...]  # (C, H, W)
    device: torch.device
    generator: torch.Generator  # CPU generator: initial images and labels
    log: Callable[[str], None] = print
    extras: dict[str, Any] | None = None
    bn_traces: list[list[float]] = field(default_factory=list)  # per batch: optimise_pixels(trace=...)


TRACE_EVERY = 10


def convergence(traces: list[list[float]], iters: int, window: int = 100) -> dict[str, Any]:
    """Whether the synthesis converged by docs/budget.md's rule (the BN-statistics loss falls by less than 5 %
    over the last 100 iterations): per batch, the BN loss averaged over each block of ``TRACE_EVERY`` steps, and
    the mean over batches of the relative drop between the last block and the block ``window`` steps before
    it, 1 - L_last / L_back (None unless ``iters`` is a multiple of ``TRACE_EVERY`` and exceeds ``window``).
    Non-finite losses are written as None (strict JSON)."""
    back = window // TRACE_EVERY
    drops = [1.0 - t[-1] / t[-1 - back] for t in traces if len(t) > back and t[-1 - back] != 0]
    measured = drops and len(drops) == len(traces) and iters % TRACE_EVERY == 0
    drop = sum(drops) / len(drops) if measured else None
    finite = [[v if math.isfinite(v) else None for v in t] for t in traces]
    return {"every": TRACE_EVERY, "bn_loss": finite, "drop_last_100": drop if drop is None or math.isfinite(drop)
            else None}  # fmt: skip


def check_common(cfg, name: str) -> None:
    """Checks of the pixel-optimising synthesizers' common settings (ZeroQ, IntraQ): one-line ConfigErrors."""
    for key in ("num_samples", "batch_size", "iters", "shard_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"synthesis.{name}.{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.patience < 0:
        raise ConfigError(f"synthesis.{name}: lr must be > 0, min_lr and patience >= 0")


def batch_sizes(total: int, batch: int) -> list[int]:
    """Split ``total`` samples into batches of ``batch`` (the last one smaller)."""
    return [min(batch, total - s) for s in range(0, total, batch)]


def optimise_pixels(
    x0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    iters: int,
    lr: float,
    patience: int,
    min_lr: float = 1e-4,
    trace: list[float] | None = None,
    trace_value: Callable[[], float] | None = None,
) -> tuple[torch.Tensor, float]:
    """Adam on the pixels of ``x0`` with ReduceLROnPlateau stepped on the loss; returns (x, last loss).
    ``trace``: appended the mean of ``trace_value()`` (default: the loss) over each block of ``TRACE_EVERY``
    steps (steps 1-10, 11-20, ...; a shorter last block).

    Adam's default betas (0.9, 0.999) and eps, as ``optim.Adam([x], lr=0.5)`` in ZeroQ, IntraQ and HAST
    ``distill_data.py`` (the one pixel loop of the ZeroQ, IntraQ and HAST synthesizers). Gradients are taken
    w.r.t. x only, so the teacher's parameters collect none.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, patience=patience)
    last = float("nan")
    block: list[float] = []
    for step in progress(range(iters), desc="synthesis"):
        loss = loss_fn(x, step)
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        last = float(loss.detach())
        sched.step(last)
        if trace is not None:
            block.append(trace_value() if trace_value is not None else last)
            if len(block) == TRACE_EVERY or step == iters - 1:
                trace.append(sum(block) / len(block))
                block = []
    return x.detach(), last


@torch.no_grad()
def teacher_confidence(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 512):
    """p_teacher(label | x) for every sample (the shard's difficulty is 1 - p)."""
    out = []
    for s in range(0, len(images), batch):
        logits = teacher(images[s : s + batch])
        out.append(
            logits.softmax(1).gather(1, labels[s : s + batch, None].to(logits.device)).squeeze(1).cpu()
        )
    return torch.cat(out)
