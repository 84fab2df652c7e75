"""The job a stage runs in: where it computes (device, CPU threads), where it reports (MLflow tracker, log) and
where it keeps epoch checkpoints (``resume_root``).

Every stage function takes one ``job: Job`` after its inputs, config and outputs; the command layer
(``zsqpipe.commands``) builds it from the command's ``--device/--threads/--resume-root/--tracking`` options and
owns the tracked run around the call. None of these fields is a result-defining parameter: the seed and every
hyperparameter belong to the stage's config (its Snakemake ``params:``), the device and threads are run-time
settings like the rule's ``threads`` (``zsqpipe.resume.runtime_key`` records them where they matter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zsqpipe.tracking import Tracker


@dataclass
class Job:
    """Run-time context of one stage call (defaults: a plain call from Python, e.g. a test or a notebook)."""

    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda or cuda:N
    threads: int | None = None  # torch CPU threads; None: torch's default
    tracker: Tracker = field(default_factory=Tracker)  # a disabled tracker accepts every call
    log: Callable[[str], None] = print
    resume_root: Path | None = None  # epoch checkpoints (zsqpipe.resume); None: neither resume nor checkpoint

    @classmethod
    def quiet(cls, **kwargs) -> Job:
        """A job that logs nothing (tests)."""
        return cls(log=lambda _msg: None, **kwargs)
