"""Stage ``generator-warmup``: train a method's generator on the FP model alone, once for every bit width.

GDFQ's and Qimera's warm-up epochs and HAST's and IntraQ's range calibration train a generator that never
sees the student (``zsqpipe/warmups.py``), so its run is the same in every cell of one (FP model, settings,
seed). This stage runs it once and records every batch and the generator's final state
(``zsqpipe.zsq.warmup.WarmupRecord``); each cell replays the batches through its own student. Like
``synthesize`` it reads no real data and gets no dataset manifest.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from zsqpipe.data import forbid_real_data
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file
from zsqpipe.job import Job
from zsqpipe.methods.base import frozen_teacher, get_method
from zsqpipe.stages.model_io import model_from_checkpoint
from zsqpipe.warmups import CALIBRATION_FIELDS, WARMUP_KINDS
from zsqpipe.zsq.calibration import CalibrationGenerator, calibration_generator_run
from zsqpipe.zsq.warmup import WarmupRecorder


def run_generator_warmup(fp_checkpoint: Path, spec: dict, seed: int, out: Path, job: Job | None = None) -> dict:
    """Record the warm-up ``spec`` (``zsqpipe.warmups.warmup_spec``) of seed ``seed`` to ``out``."""
    job = job or Job()
    kind = spec.get("kind")
    if kind not in WARMUP_KINDS:
        raise ConfigError(f"--spec: kind expected one of {list(WARMUP_KINDS)}, got {kind!r}")
    setup_runtime(job.threads, seed)
    dev = resolve_device(job.device)
    fp_model, ckpt = model_from_checkpoint(fp_checkpoint, dev)
    ctx = SimpleNamespace(teacher=frozen_teacher(fp_model), seed=seed, device=dev, num_classes=ckpt["num_classes"],
                          input_shape=(ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"]))  # fmt: skip
    settings = {k: v for k, v in spec.items() if k != "kind"}
    job.tracker.log_params({"kind": kind, "seed": seed, "spec": settings})
    recorder, timer, state = WarmupRecorder(), Timer(), None
    with forbid_real_data(f"generator warm-up {kind!r}"):
        if kind == "calib":
            if set(settings) != set(CALIBRATION_FIELDS["hast"]):
                raise ConfigError(f"--spec: a calib warm-up needs exactly {sorted(CALIBRATION_FIELDS['hast'])}")
            gen = CalibrationGenerator(**settings)
            for x, y, loss in calibration_generator_run(ctx.teacher, ctx.num_classes, ctx.input_shape, gen, seed, dev,
                                                        recorder):  # fmt: skip
                recorder.add(x, y, loss)
        else:
            method = get_method(kind)(settings)
            if method.warmup_spec() != spec:  # the spec must name every setting the warm-up reads
                raise ConfigError(f"--spec: not a complete {kind} warm-up spec (zsqpipe.warmups.warmup_spec)")
            state = method.record_warmup(ctx, recorder)
    record = recorder.record(spec, seed, sha256_file(fp_checkpoint), state)
    record.wall_time_s = timer()
    record.save(out)
    g_loss = record.g_loss
    summary = {"steps": record.steps, "batch_size": int(record.images.shape[1]), "g_loss_first": float(g_loss[0]),
               "g_loss_last": float(g_loss[-1]), "g_loss_mean": float(g_loss.mean()),
               "wall_time_s": record.wall_time_s}  # fmt: skip
    job.tracker.log_metrics(summary)
    job.log(f"{kind} warm-up, seed {seed}: {record.steps} generator steps of {summary['batch_size']} in "
            f"{record.wall_time_s:.0f}s (L_G {summary['g_loss_first']:.3f} -> {summary['g_loss_last']:.3f})")  # fmt: skip
    return summary
