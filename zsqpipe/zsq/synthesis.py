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
    loss_traces: list[list[float]] = field(default_factory=list)  # per batch: optimise_pixels(trace=...)


TRACE_EVERY = 10


def convergence(traces: list[list[float]], iters: int, window: int = 100) -> dict[str, Any]:
    """What the synthesis loss did (docs/budget.md's rule: synthesis runs until the loss falls by less than
    5 % over the last 100 iterations): per batch, the loss of step 1 and of every ``TRACE_EVERY``-th step, and
    the mean over batches of the relative drop over the last ``window`` steps, 1 - L_T / L_{T-window} (None
    when a batch's steps are fewer or not a multiple of ``TRACE_EVERY``)."""
    back = window // TRACE_EVERY
    drops = [1.0 - t[-1] / t[-1 - back] for t in traces if len(t) > back + 1 and t[-1 - back] != 0]
    measured = drops and len(drops) == len(traces) and iters % TRACE_EVERY == 0
    return {"every": TRACE_EVERY, "loss": traces, "drop_last_100": sum(drops) / len(drops) if measured else None}


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
) -> tuple[torch.Tensor, float]:
    """Adam on the pixels of ``x0`` with ReduceLROnPlateau stepped on the loss; returns (x, last loss).
    ``trace``: appended the loss of the first step and of every ``TRACE_EVERY``-th (steps 1, 10, 20, ...; and
    the last).

    Adam's default betas (0.9, 0.999) and eps, as ``optim.Adam([x], lr=0.5)`` in ZeroQ, IntraQ and HAST
    ``distill_data.py`` (the one pixel loop of the ZeroQ, IntraQ and HAST synthesizers). Gradients are taken
    w.r.t. x only, so the teacher's parameters collect none.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, patience=patience)
    last = float("nan")
    for step in progress(range(iters), desc="synthesis"):
        loss = loss_fn(x, step)
        (x.grad,) = torch.autograd.grad(loss, [x])
        opt.step()
        last = float(loss.detach())
        sched.step(last)
        if trace is not None and (step == 0 or (step + 1) % TRACE_EVERY == 0 or step == iters - 1):
            trace.append(last)
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
