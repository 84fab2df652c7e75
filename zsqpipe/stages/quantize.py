"""Stage ``quantize``: quantize the FP model and run a method's calibration / fine-tuning.

Writes the final quantized model (``model.pt``) and the per-epoch history (``history.json``: validation and
test top-1 after every epoch, so ``evaluate`` can report last-epoch, best-epoch (test-selected, as the papers
do) and validation-selected accuracy).

With ``job.resume_root`` set, the method's epoch loop is checkpointed after every epoch outside the outputs
(``zsqpipe.resume``) and a rerun after a kill continues from the last checkpoint, with the same result as an
uninterrupted run; the checkpoints are removed once the outputs are written.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from zsqpipe.data import make_loader
from zsqpipe.data.shards import ShardSet
from zsqpipe.engine import Timer, evaluate
from zsqpipe.errors import ConfigError, IntegrityError, OutputError
from zsqpipe.io import atomic_path, json_text, os_reason, read_json, save_checkpoint, sha256_file
from zsqpipe.job import Job
from zsqpipe.methods import QuantContext, get_method
from zsqpipe.methods.base import teacher_and_student
from zsqpipe.quant import QuantConfig
from zsqpipe.stages.common import combine, eval_loader, split_test
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.model_io import model_from_checkpoint
from zsqpipe.stages.training import TrainingRun
from zsqpipe.zsq.warmup import WarmupRecord

EVAL_BATCH = 1000


def _open_samples(method: str, method_obj, samples: Path | None, fp_sha256: str,
                  samples_seed: int) -> ShardSet | None:  # fmt: skip
    """The method's verified synthetic samples (None for methods that train on none), checked against the FP
    checkpoint (its SHA-256) and the seed (``samples_seed``: the cell's unless fixed) they were synthesized with."""
    if method_obj.synthesizer is None:
        return None
    if samples is None:
        raise ConfigError(f"method {method!r} trains on {method_obj.synthesizer!r} samples: pass --samples")
    shard_set = ShardSet.open(Path(samples) / "manifest.json")
    shard_set.verify()  # fail now, not after the calibration (each shard is re-verified when read)
    if shard_set.manifest.get("fp_checkpoint_sha256") != fp_sha256:
        raise IntegrityError(f"{samples}: samples were synthesized from a different FP checkpoint")
    if shard_set.manifest.get("seed") != samples_seed:
        raise IntegrityError(f"{samples}: samples were synthesized with seed {shard_set.manifest.get('seed')}, "
                             f"expected {samples_seed} (--seed, --inputs-seed or --samples-seed)")
    return shard_set


def _open_warmup(method: str, method_obj, warmup: Path | None, fp_sha256: str, seed: int,
                 warmup_seed: int) -> WarmupRecord | None:  # fmt: skip
    """The recorded generator warm-up a cell replays (``zsqpipe generator-warmup``), checked against the
    method's settings, the FP checkpoint and ``warmup_seed`` (the cell's seed unless fixed); None: the method
    trains its generator itself. A record of another seed is replayed without adopting its random state: the
    cell's own draws (a GDFQ/Qimera generator's noise after the warm-up included) follow the cell's seed."""
    spec = method_obj.warmup_spec()
    if warmup is None:
        if warmup_seed != seed and spec is not None:
            raise ConfigError(f"--inputs-seed: method {method!r} trains its generator in the cell with the cell's "
                              "seed; pass the --warmup recorded for the inputs seed (--inputs-seed or --warmup-seed)")
        return None
    if spec is None:
        raise ConfigError(f"--warmup: method {method!r} with these settings trains no generator on the teacher alone")
    record = WarmupRecord.load(warmup, spec, fp_sha256, warmup_seed)
    record.adopt_rng = warmup_seed == seed
    return record


def _teacher_and_student(fp_checkpoint: Path, quant_cfg: QuantConfig, dev: torch.device):
    """The frozen FP teacher and its fake-quantized copy (trainable), both channels_last."""
    fp_model, fp_ckpt = model_from_checkpoint(fp_checkpoint, dev)
    return *teacher_and_student(fp_model, quant_cfg), fp_ckpt


def _correct(result: dict) -> int:
    """Correctly classified images of an ``evaluate`` result (top-1 % x n, exact)."""
    return round(result["top1"] * result["n"] / 100)


class EpochEvaluator:
    """``end_epoch`` of a method: validation and test top-1 of the student after every epoch (the test set
    split into the probe images ``evaluate`` re-checks and the rest), recorded in the run's history and saved
    in an epoch checkpoint."""

    def __init__(self, run: TrainingRun, student, data, dev):
        self.run, self.student = run, student
        self.val = eval_loader(data.val, data.info, EVAL_BATCH, dev)
        self.probe, self.test_rest = split_test(data.test, data.info, dev)

    def __call__(self, epoch: int, extra: dict) -> dict:
        v, p = evaluate(self.student, self.val), evaluate(self.student, self.probe)
        t = combine(p, evaluate(self.student, self.test_rest)) if self.test_rest is not None else p
        rec = {"epoch": epoch, **extra, "val_top1": v["top1"], "test_top1": t["top1"], "test_top5": t["top5"],
               "probe_correct": _correct(p), "time_s": self.run.timer()}  # fmt: skip
        self.run.record(rec)
        self.run.log(f"epoch {epoch}: val {v['top1']:.2f} test {t['top1']:.2f} ({rec['time_s']:.0f}s)")
        self.run.checkpoints.save(epoch)
        return rec

    def probe_correct(self) -> int:
        return _correct(evaluate(self.student, self.probe))


def _reference_summary(path: Path | None) -> dict | None:
    """The ``summary`` of another cell's history.json (an LR-matched control's reference), or None."""
    if path is None:
        return None
    summary = read_json(path).get("summary")
    if not isinstance(summary, dict):
        raise IntegrityError(f"{path}: history.json has no summary (not a TALR cell's history, or written before it)")
    return summary


def _publish(out_model: Path, out_history: Path, ckpt: dict, result: dict) -> None:
    """model.pt and history.json, both or neither; history.json (with model.pt's SHA-256) is published last."""

    def write_history(tmp_model: Path) -> None:
        # evaluate checks model.pt against this hash (exact), then re-tests it on the probe images
        result["model_sha256"] = sha256_file(tmp_model)
        try:
            tmp_history.write_text(json_text(result))
        except OSError as e:  # name the file that failed, not the checkpoint being published
            raise OutputError(f"{out_history}: cannot write ({os_reason(e)}); no partial file was left") from e

    with atomic_path(out_history) as tmp_history:
        save_checkpoint(out_model, ckpt, before_publish=write_history)


def run_quantize(
    fp_checkpoint: Path,
    dataset_manifest: Path,
    method: str,
    method_cfg: dict,
    quant_cfg: QuantConfig,
    seed: int,
    out_model: Path,
    out_history: Path,
    samples: Path | None = None,
    job: Job | None = None,
    warmup: Path | None = None,
    lr_reference: Path | None = None,
    inputs_seed: int | None = None,
    samples_seed: int | None = None,
    warmup_seed: int | None = None,
) -> dict:
    """``inputs_seed``: the seed ``samples`` and ``warmup`` were made with, if not ``seed`` (holds a cell's
    inputs fixed while its fine-tuning seed varies); ``samples_seed`` / ``warmup_seed``: the same for one of the
    two inputs only (over ``inputs_seed``), which splits a spread between the samples and the generator."""
    job = job or Job()
    method_obj = get_method(method)(method_cfg)
    fp_sha256 = sha256_file(fp_checkpoint)
    inputs_seed = seed if inputs_seed is None else inputs_seed
    samples_seed = inputs_seed if samples_seed is None else samples_seed
    warmup_seed = inputs_seed if warmup_seed is None else warmup_seed
    shard_set = _open_samples(method, method_obj, samples, fp_sha256, samples_seed)
    recorded = _open_warmup(method, method_obj, warmup, fp_sha256, seed, warmup_seed)
    key = {"method": method, "method_cfg": method_obj.config_dict(), "quant": quant_cfg.to_dict(), "seed": seed,
           "fp_checkpoint_sha256": fp_sha256, "data_manifest_sha256": sha256_file(dataset_manifest),
           "samples_manifest_sha256": sha256_file(shard_set.manifest_path) if shard_set is not None else None,
           "warmup_sha256": sha256_file(warmup) if recorded is not None else None,
           "lr_reference_sha256": sha256_file(lr_reference) if lr_reference is not None else None}  # fmt: skip
    run = TrainingRun(job, "quantize", key, out_model, seed, code=(f"zsqpipe.methods.{method}",))
    dev = run.device
    data = load_prepared(dataset_manifest)
    info = data.info
    teacher, student, fp_ckpt = _teacher_and_student(fp_checkpoint, quant_cfg, dev)
    job.tracker.log_params({"method": method, "seed": seed, "samples_seed": samples_seed,
                            "warmup_seed": warmup_seed, "quant": quant_cfg.to_dict(),
                            "method_cfg": method_obj.config_dict(), "fp_checkpoint_sha256": fp_sha256})  # fmt: skip
    end_epoch = EpochEvaluator(run, student, data, dev)
    run.timer = Timer()  # the method's clock starts here (after the set-up, as before the TrainingRun skeleton)
    run.keep_history()

    def train_loader_factory(batch_size: int, loader_seed: int, augment: bool = True):
        return make_loader(data.train, info, batch_size, train=True, seed=loader_seed, device=dev,
                           channels_last=True, augment=augment)  # fmt: skip

    ctx = QuantContext(
        teacher=teacher, student=student, device=dev, seed=seed, num_classes=info.num_classes,
        input_shape=(info.in_channels, info.image_size, info.image_size),
        train_loader_factory=train_loader_factory if method_obj.uses_real_data else None,
        end_epoch=end_epoch, log=job.log, samples=shard_set, resume=run.checkpoints, warmup=recorded,
        lr_reference=_reference_summary(lr_reference),
    )  # fmt: skip
    method_obj.run(ctx)
    history = run.history
    if not history:
        raise RuntimeError(f"method {method!r} finished without evaluating an epoch")
    if end_epoch.probe_correct() != history[-1]["probe_correct"]:
        raise RuntimeError(f"method {method!r} changed the model after its last evaluated epoch")
    student = student.to(memory_format=torch.contiguous_format).eval()
    ckpt = {"arch": fp_ckpt["arch"], "dataset": info.name, "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size, "quant": quant_cfg.to_dict(),
            "state_dict": {k: v.cpu() for k, v in student.state_dict().items()}, "method": method,
            "method_cfg": method_obj.config_dict(), "seed": seed}  # fmt: skip
    result = {"method": method, "seed": seed, "quant": quant_cfg.to_dict(), "method_cfg": asdict(method_obj.cfg),
              "history": history, "wall_time_s": run.timer(), "fp_test_top1": fp_ckpt.get("test_top1"),
              "resumed_from_epoch": run.resumed_from,
              "probe_runtime": {"device": str(dev), "threads": torch.get_num_threads()},
              **({"summary": ctx.summary} if ctx.summary else {}),
              **({"inputs_seed": inputs_seed} if inputs_seed != seed else {}),
              **({"samples_seed": samples_seed} if samples_seed != inputs_seed else {}),
              **({"warmup_seed": warmup_seed} if warmup_seed != inputs_seed else {}),
              **({"lr_reference": {"path": str(lr_reference), "sha256": key["lr_reference_sha256"]}}
                 if lr_reference is not None else {})}  # fmt: skip
    _publish(out_model, out_history, ckpt, result)
    run.finish({"wall_time_s": result["wall_time_s"]}, [(out_history, None), (out_model, "checkpoint")])
    return result
