"""The skeleton every training stage shares (fp_model, quantize, supernet_train, oqat_train).

::

    run = TrainingRun(job, "quantize", key, out_model, seed, code=("zsqpipe.methods.hast",))
    ...                                  # set-up on run.device
    run.keep_history()                   # fp_model / quantize: history + clock travel in the checkpoints
    ... run.record(rec) per epoch ...    # or: on_epoch=run.log_epoch for loops that keep their own history
    ... write the outputs (atomically, the metrics/history file last) ...
    run.finish(summary, [(out_metrics, None), (out_model, "checkpoint")])

It resolves the device and seeds the runtime (``job.threads``), keys the epoch checkpoints on everything the
result depends on (the stage's ``key`` + the code version of the stage and ``code`` modules + the runtime),
logs each epoch to the tracker (restored epochs again, so the resumed MLflow run is complete), keeps the clock
across a resume and, once the outputs are published, removes the checkpoints and logs the summary and the
artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from zsqpipe.codehash import code_version
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.job import Job
from zsqpipe.resume import Checkpoints, ResumeState, keep_history, runtime_key


class TrainingRun:
    def __init__(self, job: Job, stage: str, key: dict, out_model: Path, seed: int, *,
                 code: tuple[str, ...] = (), deterministic: bool = True):  # fmt: skip
        self.tracker, self.log = job.tracker, job.log
        self.device = resolve_device(job.device)
        setup_runtime(job.threads, seed, deterministic)
        self.resume_key = {"stage": stage, **key, "code": code_version(f"zsqpipe.stages.{stage}", *code),
                           **runtime_key(self.device)}  # fmt: skip
        state = ResumeState.for_job(job.resume_root, out_model, self.resume_key, self.log)
        self.checkpoints = Checkpoints(state, log=self.log)
        self.history: list[dict] = []
        self.timer = Timer()

    @property
    def resumed_from(self) -> int | None:
        return self.checkpoints.resumed_from

    def keep_history(self) -> None:
        """Store :attr:`history` and the clock in each checkpoint; on resume, restore both and re-log the
        restored epochs to this job's run."""
        keep_history(
            self.checkpoints, self.history, self.timer, lambda rec: self.log_epoch(rec["epoch"], rec)
        )

    def log_epoch(self, epoch: int, rec: dict) -> None:
        """One epoch's numbers on the tracker (step = epoch)."""
        self.tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=epoch)  # numbers only

    def record(self, rec: dict) -> None:
        """Append an epoch record to the history and log it."""
        self.history.append(rec)
        self.log_epoch(rec["epoch"], rec)

    def add_restored_time(self, history: list[dict]) -> None:
        """Loops that keep their own history (``time_s`` per epoch): after a resume, the clock also counts the
        restored epochs."""
        if self.resumed_from:
            self.timer.set(self.timer() + history[self.resumed_from - 1]["time_s"])

    def finish(self, summary: dict, artifacts: Iterable[tuple[Path, str | None]]) -> None:
        """After the outputs are published: drop the checkpoints, log the summary and attach the artifacts."""
        self.checkpoints.clear()
        self.tracker.log_metrics(summary)
        for path, folder in artifacts:
            self.tracker.log_artifact(path, folder)
