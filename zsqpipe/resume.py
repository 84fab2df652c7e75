"""Resumable training: epoch checkpoints kept outside a job's declared outputs.

Snakemake deletes a job's declared outputs before it reruns the job, so a long stage keeps its checkpoints in
a folder of its own: ``<root>/<output path>/<key>/state.pt`` (``root`` = ``results/.resume``; e.g.
``results/.resume/quant/fashion_mnist/resnet20/real/w4a4/seed0/model.pt/3f2a…/``). ``<key>`` hashes everything
the result depends on (the stage's config, the SHA-256 of its input files, its code version, the device, the
CPU threads and the torch version), so a changed config, input or code never resumes a stale state.

A checkpoint is written atomically (temp file + rename) after every epoch and holds the state of every object
the training loop registered (model, optimizers, LR schedulers, generators, quantizer ranges, data streams with
their exact position), all RNG states (Python, NumPy, torch CPU and CUDA) and the stage's history so far. A
rerun restores it and continues with the next epoch; on CPU in deterministic mode the result is bit-identical
to an uninterrupted run (tests/test_resume.py). A loop that registers an object whose state cannot be saved
exactly (no ``state_dict``) is not checkpointed at all: an interrupted run then restarts from scratch, never
resumes inexactly. The folder is removed once the stage's outputs are written.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsqpipe.errors import IntegrityError
from zsqpipe.io import load_checkpoint, save_checkpoint, sha256_json, write_json

FORMAT = "zsqpipe-resume/1"
STATE_FILE = "state.pt"
KEY_FILE = "key.json"


# ------------------------------------------------------------------------------------------------ RNG states


def rng_state() -> dict[str, Any]:
    """Every global RNG state: Python, NumPy, torch CPU and (when initialised) every CUDA device."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def runtime_key(device: torch.device) -> dict[str, Any]:
    """The parts of the runtime that change results bit-wise: device (GPU model), CPU threads, torch version."""
    dev = str(device.type)
    if device.type == "cuda":
        dev += ":" + torch.cuda.get_device_name(device)
    return {"device": dev, "threads": torch.get_num_threads(), "torch": torch.__version__}


class PyRandomState:
    """``state_dict``/``load_state_dict`` for a ``random.Random`` (e.g. a supernet's subnet sampler), so a
    training loop can attach it to :class:`Checkpoints` (its state is plain ints: loads with weights_only)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


class GradPresence:
    """Which parameters hold a ``.grad`` tensor (restored as zeros). With ``zero_grad(set_to_none=False)`` a
    parameter that once had a gradient keeps a zero one, so SGD's weight decay and momentum still move it
    when the current step does not use it; a restored run must start with the same parameters "present"."""

    def __init__(self, params):
        self.params = list(params)

    def state_dict(self) -> dict[str, Any]:
        return {"has_grad": [p.grad is not None for p in self.params]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        flags = state["has_grad"]
        if len(flags) != len(self.params):
            raise ValueError(f"GradPresence: {len(flags)} flags for {len(self.params)} parameters")
        for p, has in zip(self.params, flags, strict=True):
            p.grad = torch.zeros_like(p) if has else None


# ------------------------------------------------------------------------------------------ checkpoint folder


def job_dir(root: str | os.PathLike, output: str | os.PathLike) -> Path:
    """The folder of one job's checkpoints: ``root / <output relative to root's parent>``.

    ``results/.resume`` + ``results/quant/…/model.pt`` -> ``results/.resume/quant/…/model.pt``; an output
    outside root's parent gets ``root / "abs" / <its absolute path>``.
    """
    root = Path(root)
    out = Path(os.path.abspath(output))
    try:
        rel = out.relative_to(Path(os.path.abspath(root)).parent)
    except ValueError:
        rel = Path("abs", *out.parts[1:])
    return root / rel


def _retry_mkdir(fn: Callable[[], None], attempts: int = 3) -> None:
    """Run ``fn``; a parallel job's clean-up may remove an empty parent folder between mkdir and the write."""
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            if i == attempts - 1:
                raise


class ResumeState:
    """The checkpoint folder of one job (``directory`` None: resume is off and every method does nothing)."""

    def __init__(
        self,
        directory: Path | None,
        job: Path | None = None,
        root: Path | None = None,
        key: dict | None = None,
        log=print,
    ):
        self.directory, self.job, self.root, self.key, self.log = directory, job, root, key, log

    @classmethod
    def for_job(
        cls, root: str | os.PathLike | None, output: str | os.PathLike, key: dict[str, Any], log=print
    ) -> ResumeState:
        """The folder for the job writing ``output`` whose result depends on ``key`` (``root`` None: off)."""
        if root is None:
            return cls(None, log=log)
        job = job_dir(root, output)
        return cls(job / sha256_json(key)[:16], job, Path(root), key, log)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint, or None (none yet, or unreadable: then the run starts from scratch)."""
        if not self.enabled:
            return None
        if not self.path.is_file():
            others = [p.name for p in self.job.iterdir() if p != self.directory] if self.job.is_dir() else []
            if others:
                self.log(f"resume: ignoring checkpoints of another config or code version in {self.job}")
            return None
        try:
            state = load_checkpoint(self.path)
        except IntegrityError as e:
            self.log(f"resume: starting from scratch: {e}")
            return None
        if state.get("format") != FORMAT:
            self.log(f"resume: starting from scratch: {self.path} is not a {FORMAT} checkpoint")
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically as the job's checkpoint (the previous one stays until the rename)."""
        if not self.enabled:
            return
        if not (self.directory / KEY_FILE).is_file():  # what the hash stands for, for people
            _retry_mkdir(lambda: write_json(self.directory / KEY_FILE, self.key))
        _retry_mkdir(lambda: save_checkpoint(self.path, {"format": FORMAT, **state}))

    def discard(self) -> None:
        """Remove this key's checkpoint (it cannot be restored)."""
        if self.enabled:
            shutil.rmtree(self.directory, ignore_errors=True)

    def clear(self) -> None:
        """Remove the job's checkpoints (every key: the outputs are written now) and the empty folders above."""
        if not self.enabled:
            return
        shutil.rmtree(self.job, ignore_errors=True)
        stop = self.root.parent
        parent = self.job.parent
        while parent != stop and stop in parent.parents:
            try:
                parent.rmdir()  # only if empty: other jobs' checkpoints stay
            except OSError:
                break
            parent = parent.parent


# ---------------------------------------------------------------------------------------- training loops


def plain_state(obj: Any) -> Any:
    """NumPy scalars (e.g. LR values from ``np.cos`` schedules) as Python numbers, the same values: the
    checkpoint must load with ``weights_only=True``."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, plain_state(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # nn.Module.state_dict's version info
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(plain_state(v) for v in obj)
    return obj


def _stateful(obj: Any) -> bool:
    return isinstance(obj, torch.Generator) or (
        callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
    )


def _get_state(obj: Any) -> Any:
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _set_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    else:
        obj.load_state_dict(state)


class Checkpoints:
    """Epoch-boundary checkpoints of one training loop, stored in a :class:`ResumeState`.

    ::

        start = checkpoints.attach(model=model, optimizer=opt, scheduler=sched, batches=stream, rng=gen)
        for epoch in range(start, epochs):
            ...                      # train, evaluate, record
            checkpoints.save(epoch)  # everything attached + RNG states + get_extra()

    ``attach`` registers the loop's stateful objects (``state_dict``/``load_state_dict``, or a
    ``torch.Generator``; None values are skipped) and, if the job has a checkpoint, restores them, the RNG
    states and the stage's own bookkeeping (``set_extra``), and returns the first epoch to run. Call it once,
    after the loop's set-up and right before its first epoch. ``save`` does nothing until ``attach`` was
    called, so a loop that never attaches is never checkpointed (its interrupted run restarts from scratch).
    """

    def __init__(
        self,
        state: ResumeState,
        get_extra: Callable[[], dict] = dict,
        set_extra: Callable[[dict], None] = lambda _extra: None,
        log=print,
    ):
        self.state, self.get_extra, self.set_extra, self.log = state, get_extra, set_extra, log
        self.objects: dict[str, Any] | None = None
        self.resumed_from: int | None = None  # the first epoch run after a restore
        self._pending = state.load()

    def attach(self, **objects: Any) -> int:
        if not self.state.enabled:
            return 0
        if self.objects is not None:
            raise RuntimeError("Checkpoints.attach: called twice")
        objects = {k: v for k, v in objects.items() if v is not None}
        blocked = [f"{k} ({type(v).__name__})" for k, v in objects.items() if not _stateful(v)]
        ck, self._pending = self._pending, None
        if blocked:
            self.log(
                f"resume: off: {', '.join(blocked)} cannot save its state exactly; an interrupted run "
                "restarts from scratch"
            )
            return 0
        self.objects = objects
        if ck is None:
            self.log(f"resume: checkpoint after every epoch in {self.state.directory}")
            return 0
        if sorted(ck["objects"]) != sorted(objects):
            self.log(
                f"resume: starting from scratch: the checkpoint holds {sorted(ck['objects'])}, "
                f"the loop has {sorted(objects)}"
            )
            return 0
        try:
            for name, obj in objects.items():
                _set_state(obj, ck["objects"][name])
            set_rng_state(ck["rng"])
            self.set_extra(ck["extra"])
        except Exception as e:  # objects are half restored: this run cannot continue exactly
            self.state.discard()
            raise IntegrityError(
                f"{self.state.path}: cannot restore the checkpoint ({type(e).__name__}: {e}); removed it, "
                "a rerun starts from scratch"
            ) from e
        start = int(ck["epoch"]) + 1
        self.resumed_from = start
        self.log(f"resume: resumed from epoch {start} (epochs 0-{start - 1} restored from {self.state.path})")
        return start

    def save(self, epoch: int) -> None:
        if self.objects is None:
            return
        self.state.save(
            plain_state(
                {
                    "epoch": int(epoch),
                    "objects": {name: _get_state(obj) for name, obj in self.objects.items()},
                    "rng": rng_state(),
                    "extra": self.get_extra(),
                }
            )
        )

    def clear(self) -> None:
        self.state.clear()


def keep_history(
    checkpoints: Checkpoints,
    history: list[dict],
    timer,
    on_restored: Callable[[dict], None] | None = None,
) -> None:
    """Store ``history`` (one record per epoch) and the clock ``timer`` (an :class:`zsqpipe.engine.Timer`) in every
    checkpoint; on a restore, both continue from the checkpoint and ``on_restored(rec)`` is called for each
    restored record (for loops whose ``attach`` is called elsewhere, e.g. by a method plug-in)."""

    def restore(extra: dict) -> None:
        history[:] = extra["history"]
        timer.set(extra["time_s"])
        if on_restored is not None:
            for rec in history:
                on_restored(rec)

    checkpoints.get_extra = lambda: {"history": history, "time_s": timer()}
    checkpoints.set_extra = restore


def attach_epoch_loop(
    checkpoints: Checkpoints | None,
    history: list[dict],
    timer,
    on_epoch: Callable[[int, dict], None] | None = None,
    **objects: Any,
) -> int:
    """Wire a loop that keeps one record per epoch in ``history`` and its clock in ``timer`` (an
    :class:`zsqpipe.engine.Timer`) to ``checkpoints`` (None: no resume), attach ``objects`` and return the
    first epoch to run. On a restore, ``history`` and the clock continue from the checkpoint and every
    restored record is passed to ``on_epoch`` again (e.g. this MLflow run gets the restored epochs too).
    The loop calls ``checkpoints.save(epoch)`` after each epoch."""
    if checkpoints is None:
        return 0
    keep_history(checkpoints, history, timer)
    first = checkpoints.attach(**objects)
    if on_epoch is not None:  # after attach: a failing callback (e.g. MLflow) must not discard the checkpoint
        for rec in history[:first]:
            on_epoch(rec["epoch"], rec)
    return first
