"""The method interface shared by every quantization method (real-data references and zero-shot methods)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from zsqpipe.config import from_dict
from zsqpipe.names import METHOD_NAMES  # every method shipped (module zsqpipe/methods/<name>.py)
from zsqpipe.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", declared=METHOD_NAMES, module="zsqpipe.methods.{}")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass as ``name`` (declared in ``zsqpipe.names``)."""

    def deco(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def teacher_and_student(fp_model: nn.Module, quant_cfg) -> tuple[nn.Module, nn.Module]:
    """What every method starts from: the frozen FP teacher (``fp_model`` in eval mode, no gradients) and its
    fake-quantized, trainable copy (``quant_cfg``: a ``zsqpipe.quant.QuantConfig``), both channels_last."""
    from zsqpipe.quant import quantize_model

    teacher = fp_model.eval().requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher), quant_cfg)
    for p in student.parameters():
        p.requires_grad_(True)
    return frozen_teacher(teacher), student.to(memory_format=torch.channels_last)


def frozen_teacher(fp_model: nn.Module) -> nn.Module:
    """``fp_model`` as every method's teacher: eval mode, no gradients, channels_last."""
    return fp_model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


@dataclass
class QuantContext:
    """What a method gets: the FP teacher, the quantized student, data access and bookkeeping.

    ``train_loader_factory`` gives real training batches; it is ``None`` for methods that must not see real
    data (``Method.uses_real_data = False``). ``end_epoch(epoch, metrics)`` evaluates the student on the
    validation split and the test set, records the epoch in the history, logs it, checkpoints the loop (see
    :meth:`resumable`) and returns the record.
    """

    teacher: nn.Module
    student: nn.Module
    device: torch.device
    seed: int
    num_classes: int
    input_shape: tuple[int, ...]
    train_loader_factory: Callable[..., Any] | None  # (batch_size, seed, augment=True) -> loader
    end_epoch: Callable[[int, dict[str, float]], dict[str, float]]
    log: Callable[[str], None] = print
    samples: Any = None  # zsqpipe.data.shards.ShardSet of the method's synthesizer, if it has one
    # zsqpipe.zsq.warmup.WarmupRecord: the method's generator warm-up, recorded once for every bit width
    # (zsqpipe/warmups.py); None: the method trains its generator itself
    warmup: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    # the ``summary`` of another cell's history.json (quantize --lr-reference): what an LR-matched control matches
    lr_reference: dict[str, Any] | None = None
    # what the method reports about its run beyond the per-epoch history (history.json ``summary``; e.g. TALR's)
    summary: dict[str, Any] = field(default_factory=dict)
    resume: Any = None  # zsqpipe.resume.Checkpoints of the job (stages/quantize.py); None: no checkpoints

    def resumable(self, **state: Any) -> int:
        """Make the method's epoch loop resumable; returns the first epoch to run (0 unless resuming).

        Call once, after the set-up (calibration etc., which a resumed run repeats and then overwrites) and right
        before the first epoch, with every object whose state carries from one epoch to the next besides the
        student: optimizers, LR schedulers, generators, ``torch.Generator``s, batch streams (each with
        ``state_dict``/``load_state_dict``; None is skipped). They are restored here from the job's last
        checkpoint, if any (with the student and all RNG states), and saved after every ``end_epoch``. An
        object without a ``state_dict`` turns checkpoints off for the run. A method that never calls this is
        not resumable: an interrupted run restarts from scratch.
        """
        if self.resume is None:
            return 0
        return self.resume.attach(student=self.student, **state)


class Method:
    """Base class. Subclasses set ``Config`` (a dataclass of hyperparameters) and implement ``run``."""

    name: ClassVar[str] = "base"
    uses_real_data: ClassVar[bool] = False
    synthesizer: ClassVar[str | None] = None  # offline samples it trains on (names.METHOD_SYNTHESIZER)
    Config: ClassVar[type] = object

    def __init__(self, cfg: dict[str, Any] | None = None):
        self.cfg = from_dict(self.Config, cfg, prefix=f"methods.{self.name}")

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def warmup_spec(self) -> dict[str, Any] | None:
        """The settings of this method's generator warm-up, shared across bit widths (``zsqpipe/warmups.py``);
        None if it has none."""
        from zsqpipe.warmups import warmup_spec

        return warmup_spec(self.name, self.config_dict())

    def run(self, ctx: QuantContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError
