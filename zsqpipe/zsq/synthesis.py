"""Data-free sample synthesis by optimising inputs against a frozen FP teacher (noise optimisation).

A synthesizer is registered with ``@register_synthesizer(name, ConfigDataclass)`` and called as
``fn(teacher, cfg, ctx) -> (images, labels)``; the ``synthesize`` stage then scores every sample's difficulty
1 - p_teacher(label) and writes shards. Synthesizers see only the teacher, the input shape and the number of
classes: the stage runs them under :func:`zsqpipe.data.forbid_real_data`.

Shared optimisation loop (ZeroQ ``distill_data.py``, IntraQ/HAST ``data_generate/distill_data.py``): for each
batch, x ~ N(0, 1) (or ZeroQ's uniform init) is optimised with Adam and ``ReduceLROnPlateau`` on the total
loss for ``iters`` steps, or, with ``stop_drop`` > 0, until the BN-statistics loss stops falling
(docs/budget.md's rule: < ``stop_drop`` over the last 100 steps), ``iters`` being the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import nn

from zsqpipe.config import Doc, Range
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
    steps: list[int] = field(default_factory=list)  # per batch: the pixel steps taken (< iters if it converged)


TRACE_EVERY = 10
STOP_WINDOW = 100  # the rule's window: the BN loss's drop over the last 100 steps (docs/budget.md)
StopDrop = Annotated[float, Range(ge=0, lt=1), Doc(
    "Stop a batch once the best of its BN-statistics loss (10-step block means) improved by less than this "
    "fraction over the last 100 steps (docs/budget.md's convergence rule), iters being the cap; 0 = always run "
    "iters.")]
KeepBest = Annotated[bool, Doc(
    "Return each batch's pixels at its lowest loss instead of the last ones (official: the last); guards against "
    "Adam's late jumps (docs/budget.md).")]


def block_drop(trace: list[float], window: int = STOP_WINDOW) -> float | None:
    """1 - min(last ``window`` steps) / min(before them): how much the best ``TRACE_EVERY``-step block mean of
    ``trace`` improved over the last ``window`` steps (ReduceLROnPlateau's relative threshold on the best value;
    a one-block spike neither stops nor hides the fall). For a falling trace it is 1 - L_last / L_back. None
    while there is no block ``window`` steps back, or no finite positive best before it."""
    back = window // TRACE_EVERY
    recent = [v for v in trace[-back:] if math.isfinite(v)]
    before = [v for v in trace[:-back] if math.isfinite(v)]
    if len(trace) <= back or not recent or not before or min(before) <= 0:
        return None
    return 1.0 - min(recent) / min(before)


def convergence(traces: list[list[float]], steps: list[int], window: int = STOP_WINDOW) -> dict[str, Any]:
    """Whether the synthesis converged by docs/budget.md's rule (the BN-statistics loss falls by less than 5 %
    over the last 100 iterations): per batch, the BN loss averaged over each block of ``TRACE_EVERY`` steps, and
    the mean over batches of :func:`block_drop`, the relative improvement of the best block over the last
    ``window`` steps (None unless every batch's step count, ``steps``, is a multiple of ``TRACE_EVERY`` and
    exceeds ``window``). Non-finite losses are written as None (strict JSON)."""
    drops = [d for t in traces if (d := block_drop(t, window)) is not None]
    measured = drops and len(drops) == len(traces) and all(n % TRACE_EVERY == 0 for n in steps)
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
    stop_drop: float = 0.0,
    keep_best: bool = False,
) -> tuple[torch.Tensor, float, int]:
    """Adam on the pixels of ``x0`` with ReduceLROnPlateau stepped on the loss; returns (x, last loss, steps).
    ``trace``: appended the mean of ``trace_value()`` (default: the loss) over each block of ``TRACE_EVERY``
    steps (steps 1-10, 11-20, ...; a shorter last block).
    ``stop_drop`` > 0: stop at the end of the first block where :func:`block_drop` (the best block mean's
    improvement over the last ``STOP_WINDOW`` steps) is below ``stop_drop`` — docs/budget.md's "until the
    BN-statistics loss stops falling" — with ``iters`` as the cap (a loss that rises for 100 steps counts as not
    falling; an all-NaN window never stops it).
    ``keep_best``: return the pixels of the lowest loss seen (and that loss) instead of the last ones, which the
    official loops return. Adam at lr 0.5 whose plateau schedule never fired (the loss kept falling) can jump late:
    its second-moment estimate has shrunk with the gradient, so a sudden gradient spike moves every pixel by
    several lr at once, the loss rises 10-500x within ~10 steps and the schedule then cuts the lr before it comes
    back (docs/budget.md, "HAST's late jumps").

    Adam's default betas (0.9, 0.999) and eps, as ``optim.Adam([x], lr=0.5)`` in ZeroQ, IntraQ and HAST
    ``distill_data.py`` (the one pixel loop of the ZeroQ, IntraQ and HAST synthesizers). Gradients are taken
    w.r.t. x only, so the teacher's parameters collect none.
    """
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, patience=patience)
    last = float("nan")
    block: list[float] = []
    if trace is None and stop_drop > 0:
        trace = []
    steps = 0
    best, best_x = float("inf"), None
    for step in progress(range(iters), desc="synthesis"):
        loss = loss_fn(x, step)
        (x.grad,) = torch.autograd.grad(loss, [x])
        last = float(loss.detach())
        if keep_best and last < best:  # the loss is of x before this step's update
            best, best_x = last, x.detach().clone()
        opt.step()
        sched.step(last)
        steps = step + 1
        if trace is not None:
            block.append(trace_value() if trace_value is not None else last)
            if len(block) == TRACE_EVERY or step == iters - 1:
                trace.append(sum(block) / len(block))
                block = []
                drop = block_drop(trace) if stop_drop > 0 else None
                if drop is not None and drop < stop_drop:
                    break
    if best_x is not None:
        return best_x, best, steps
    return x.detach(), last, steps


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
