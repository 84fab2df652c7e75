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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zsqpipe.progress import progress

_SYNTHESIZERS: dict[str, tuple[Callable, type]] = {}


def register_synthesizer(name: str, config_cls: type):
    def deco(fn):
        _SYNTHESIZERS[name] = (fn, config_cls)
        return fn

    return deco


def get_synthesizer(name: str) -> tuple[Callable, type]:
    import importlib

    from zsqpipe.errors import ConfigError
    from zsqpipe.names import SYNTHESIZER_NAMES

    if name not in SYNTHESIZER_NAMES:
        raise ConfigError(
            f"synthesizer: unknown synthesizer {name!r}; expected one of {list(SYNTHESIZER_NAMES)}"
        )
    if name not in _SYNTHESIZERS:
        importlib.import_module(f"zsqpipe.zsq.synth_{name}")
    return _SYNTHESIZERS[name]


@dataclass
class SynthContext:
    num_classes: int
    shape: tuple[int, ...]  # (C, H, W)
    device: torch.device
    generator: torch.Generator  # CPU generator: initial images and labels
    log: Callable[[str], None] = print
    extras: dict[str, Any] | None = None


def optimise_batch(
    x0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    iters: int,
    lr: float,
    patience: int,
    min_lr: float = 1e-4,
) -> torch.Tensor:
    """Adam on the pixels of ``x0`` for ``iters`` steps with ReduceLROnPlateau on the loss; returns x."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)  # ZeroQ/IntraQ/HAST distill_data.py: Adam(lr=0.5), default betas
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, patience=patience)
    for step in progress(range(iters), desc="synthesis"):
        loss = loss_fn(x, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step(loss.item())
    return x.detach()


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
