"""The tests' quantization context: the stage's own teacher/student set-up (``teacher_and_student``, as
``zsqpipe.stages.quantize`` uses it) around a tiny model, with an in-memory epoch history."""

from __future__ import annotations

import torch
from torch import nn

from zsqpipe.data.shards import ShardSet, write_shards
from zsqpipe.methods.base import QuantContext, teacher_and_student
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig


def tiny_resnet(size: int = 8) -> torch.nn.Module:
    """ResNet-20 for 1 x size x size inputs, 10 classes (8 x 8 keeps a run tiny)."""
    return create_model("resnet20", 10, 1, size)


def quant_context(model=None, *, seed: int = 0, size: int = 8, quant: QuantConfig | None = None, end_epoch=None,
                  **context) -> tuple[QuantContext, list[dict]]:  # fmt: skip
    """(ctx, history): the teacher ``model()`` (built after seeding; default a tiny ResNet-20) frozen, its W4A4
    (or ``quant``) student trainable; ``end_epoch`` defaults to recording ``{"epoch", **metrics}`` in
    ``history``; other ``QuantContext`` fields (``samples``, ``train_loader_factory``, ...) pass through."""
    torch.manual_seed(seed)
    fp = model() if model is not None else tiny_resnet(size)
    teacher, student = teacher_and_student(fp, quant or QuantConfig(weight_bits=4, act_bits=4))
    history: list[dict] = []

    def record(epoch, metrics):
        rec = {"epoch": epoch, **metrics}
        history.append(rec)
        return rec

    context = {"train_loader_factory": None, "log": lambda *_: None, **context}
    ctx = QuantContext(teacher=teacher, student=student, device=torch.device("cpu"), seed=seed, num_classes=10,
                       input_shape=(1, size, size), end_epoch=end_epoch or record, **context)  # fmt: skip
    return ctx, history


def small_cnn(classes: int = 10) -> nn.Module:
    """Two conv/BN/ReLU blocks and a linear head for 1-channel inputs (faster than ResNet-20)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )  # fmt: skip


def shard_context(tmp_path, n=8, size=8, seed=0, arch="small"):
    """A quantize context on a tiny ShardSet of n random images (``arch`` "resnet20" or :func:`small_cnn`);
    the history records ``(epoch, metrics)`` pairs."""
    model = (lambda: tiny_resnet(size)) if arch == "resnet20" else small_cnn
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    write_shards(tmp_path / "shards", images, labels, torch.zeros(n), "test", seed, shard_size=n)
    history = []
    ctx, _ = quant_context(model, seed=seed, size=size, samples=ShardSet.open(tmp_path / "shards" / "manifest.json"),
                           end_epoch=lambda epoch, extra: history.append((epoch, extra)) or {})  # fmt: skip
    return ctx, history
