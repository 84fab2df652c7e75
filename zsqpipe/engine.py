"""Training/evaluation primitives shared by the stages: device and thread set-up, seeding, loops, losses."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available on this machine")
    return dev


def setup_runtime(threads: int | None, seed: int, deterministic: bool = True) -> None:
    """Set torch's CPU threads (from the rule's ``threads``) and seed Python, NumPy and torch."""
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        deterministic_algorithms()
    else:
        torch.backends.cudnn.benchmark = True


def runtime_info() -> dict[str, object]:
    """Where a result was computed: torch version, intra-op threads, the CPU kernel set and the CPU model. The same
    code and seed give bit-identical models on one machine type, not across them (docs/budget.md: the default FP
    model is 92.23 % on one AMD EPYC, 92.17 % on another, AVX512)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu or sys.platform,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip


def deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` without its import of TorchInductor (and
    with it TorchDynamo: ~2.3 s of every job's start-up on a 2-core CPU) just to set a flag a stage that never
    compiles does not read; inductor's flag is set too when it is already loaded."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # a torch without the private setter: the public API (slower start-up, same effect)
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    setter(True, warn_only=True)
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is not None:
        inductor_config.deterministic = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk: Iterable[int]) -> dict[int, int]:
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    correct = pred.eq(target[:, None])
    return {k: int(correct[:, : min(k, maxk)].any(dim=1).sum()) for k in topk}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (%) and mean cross-entropy of ``model`` (in eval mode) over ``loader``."""
    was_training = model.training
    model.eval()
    hits = dict.fromkeys(topk, 0)
    loss, n = 0.0, 0
    for x, y in loader:
        logits = model(x)
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        for k, c in accuracy_counts(logits, y, topk).items():
            hits[k] += c
        n += len(y)
    model.train(was_training)
    out = {f"top{k}": 100.0 * hits[k] / max(n, 1) for k in topk}
    out["loss"] = loss / max(n, 1)
    out["n"] = n
    return out


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (``batchmean``, IntraQ/HAST form)."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
        )
        * t
        * t
    )


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float, nesterov: bool):
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer: expected 'sgd' or 'adam', got {name!r}")


def make_scheduler(
    optimizer, name: str, total_steps: int, warmup_frac: float = 0.0, milestones=(), gamma=0.1, group_factors=None
):
    """Per-step LR schedule: ``onecycle``, ``cosine`` (with linear warm-up), ``step`` (LR x ``gamma`` at each
    milestone, given as a fraction of training) or ``constant``. ``group_factors``: {param-group index: a factor
    from :func:`lr_factor`} for groups that follow another (non-onecycle) schedule than ``name``."""
    total_steps = max(int(total_steps), 1)
    if name == "onecycle":
        if group_factors:
            raise ConfigError("schedule: onecycle cannot be combined with per-group schedules")
        lr = [g["lr"] for g in optimizer.param_groups]
        # cycle_momentum=False: the configured momentum is used as given
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=total_steps,
            pct_start=max(warmup_frac, 1e-3),
            cycle_momentum=False,
        )

    factor = lr_factor(name, total_steps, warmup_frac, milestones, gamma)
    if not group_factors:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    factors = [group_factors.get(i, factor) for i in range(len(optimizer.param_groups))]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def lr_factor(name: str, total_steps: int, warmup_frac: float = 0.0, milestones=(), gamma=0.1):
    """The LR multiplier of step t (0-based) of ``cosine`` (with linear warm-up), ``step`` or ``constant``
    over ``total_steps`` steps (what :func:`make_scheduler`'s LambdaLR applies)."""
    total_steps = max(int(total_steps), 1)
    warm = int(round(warmup_frac * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if name == "cosine":
            p = (step - warm) / max(total_steps - warm, 1)
            return 0.5 * (1 + np.cos(np.pi * min(p, 1.0)))
        if name == "step":
            return gamma ** sum(step >= m * total_steps for m in milestones)
        if name == "constant":
            return 1.0
        raise ConfigError(f"schedule: expected onecycle, cosine, step or constant, got {name!r}")

    factor(0)  # validate the name now
    return factor


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start

    def set(self, elapsed: float) -> None:
        """Continue from ``elapsed`` seconds (a resumed run counts the time of the epochs it restored)."""
        self.start = time.perf_counter() - elapsed


def infinite(loader) -> Iterable:
    while True:
        yield from loader


EpochCallback = Callable[[int, dict], None]
