"""Student optimizer steps of a ``quantize`` run: the x-axis of the budget study (docs/budget.md).

Kept apart from the method plug-ins (imported only by the plot job), so that it is not part of any method's
code version.
"""

from __future__ import annotations

from typing import Any


def student_steps(method: str, cfg: dict[str, Any] | None = None) -> int:
    """Optimizer steps the student takes: (epochs − warm-up epochs) × iters_per_epoch × student steps per
    iteration (ZAQ's ``q_steps``); 0 for calibration-only runs (``ptq``, ``zeroq`` with ``finetune: false``).
    ``cfg`` is the method's config as in ``methods.<name>`` (defaults filled in by the method's dataclass)."""
    from zsqpipe.methods import get_method

    c = get_method(method)(cfg or {}).cfg
    if not hasattr(c, "epochs") or getattr(c, "finetune", True) is False:
        return 0
    return (c.epochs - getattr(c, "warmup_epochs", 0)) * c.iters_per_epoch * getattr(c, "q_steps", 1)
