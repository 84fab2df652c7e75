"""Stage ``quantize``: quantize the FP model and run a method's calibration / fine-tuning.

Writes the final quantized model (``model.pt``) and the per-epoch history (``history.json``: validation and
test top-1 after every epoch, so ``evaluate`` can report last-epoch, best-epoch (test-selected, as the papers
do) and validation-selected accuracy).

With ``job.resume_root`` set, the method's epoch loop is checkpointed after every epoch outside the outputs
(``zsqpipe.resume``) and a rerun after a kill continues from the last checkpoint, with the same result as an
uninterrupted run; the checkpoints are removed once the outputs are written.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch

from zsqpipe.codehash import code_version
from zsqpipe.data import make_loader
from zsqpipe.data.shards import ShardSet
from zsqpipe.engine import Timer, evaluate, resolve_device, setup_runtime
from zsqpipe.errors import ConfigError, IntegrityError, OutputError
from zsqpipe.io import atomic_path, json_text, os_reason, save_checkpoint, sha256_file
from zsqpipe.job import Job
from zsqpipe.methods import QuantContext, get_method
from zsqpipe.quant import QuantConfig, quantize_model
from zsqpipe.resume import Checkpoints, ResumeState, runtime_key
from zsqpipe.stages.common import combine, eval_loader, split_test
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.model_io import model_from_checkpoint

EVAL_BATCH = 1000


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
) -> dict:
    job = job or Job()
    tracker, log = job.tracker, job.log
    method_obj = get_method(method)(method_cfg)
    shard_set = None
    if method_obj.synthesizer is not None:
        if samples is None:
            raise ConfigError(
                f"method {method!r} trains on {method_obj.synthesizer!r} samples: pass --samples"
            )
        shard_set = ShardSet.open(Path(samples) / "manifest.json")
        shard_set.verify()  # fail now, not after the calibration (each shard is re-verified when read)
        if shard_set.manifest.get("fp_checkpoint_sha256") != sha256_file(fp_checkpoint):
            raise IntegrityError(f"{samples}: samples were synthesized from a different FP checkpoint")
    dev = resolve_device(job.device)
    setup_runtime(job.threads, seed)
    fp_sha256 = sha256_file(fp_checkpoint)
    resume_key = {
        "stage": "quantize",
        "method": method,
        "method_cfg": method_obj.config_dict(),
        "quant": quant_cfg.to_dict(),
        "seed": seed,
        "fp_checkpoint_sha256": fp_sha256,
        "data_manifest_sha256": sha256_file(dataset_manifest),
        "samples_manifest_sha256": sha256_file(shard_set.manifest_path) if shard_set is not None else None,
        "code": code_version("zsqpipe.stages.quantize", f"zsqpipe.methods.{method}"),
        **runtime_key(dev),
    }
    data = load_prepared(dataset_manifest)
    info = data.info
    teacher, fp_ckpt = model_from_checkpoint(fp_checkpoint, dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = quantize_model(copy.deepcopy(teacher), quant_cfg)
    for p in student.parameters():
        p.requires_grad_(True)
    teacher = teacher.to(memory_format=torch.channels_last)
    student = student.to(memory_format=torch.channels_last)
    tracker.log_params(
        {
            "method": method,
            "seed": seed,
            "quant": quant_cfg.to_dict(),
            "method_cfg": method_obj.config_dict(),
            "fp_checkpoint_sha256": fp_sha256,
        }
    )

    val = eval_loader(data.val, info, EVAL_BATCH, dev)
    probe, test_rest = split_test(data.test, info, dev)
    history: list[dict] = []
    timer = Timer()

    def end_epoch(epoch: int, extra: dict) -> dict:
        v, p = evaluate(student, val), evaluate(student, probe)
        t = combine(p, evaluate(student, test_rest)) if test_rest is not None else p
        rec = {
            "epoch": epoch,
            **extra,
            "val_top1": v["top1"],
            "test_top1": t["top1"],
            "test_top5": t["top5"],
            "probe_correct": round(p["top1"] * p["n"] / 100),
            "time_s": timer(),
        }
        history.append(rec)
        tracker.log_metrics({k: x for k, x in rec.items() if k != "epoch"}, step=epoch)
        log(f"epoch {epoch}: val {v['top1']:.2f} test {t['top1']:.2f} ({rec['time_s']:.0f}s)")
        checkpoints.save(epoch)
        return rec

    def restore(extra: dict) -> None:
        history[:] = extra["history"]
        timer.set(extra["time_s"])
        for rec in history:  # this MLflow run gets the restored epochs too
            tracker.log_metrics({k: x for k, x in rec.items() if k != "epoch"}, step=rec["epoch"])

    checkpoints = Checkpoints(
        ResumeState.for_job(job.resume_root, out_model, resume_key, log),
        get_extra=lambda: {"history": history, "time_s": timer()},
        set_extra=restore,
        log=log,
    )

    def train_loader_factory(batch_size: int, loader_seed: int, augment: bool = True):
        return make_loader(
            data.train,
            info,
            batch_size,
            train=True,
            seed=loader_seed,
            device=dev,
            channels_last=True,
            augment=augment,
        )

    ctx = QuantContext(
        teacher=teacher,
        student=student,
        device=dev,
        seed=seed,
        num_classes=info.num_classes,
        input_shape=(info.in_channels, info.image_size, info.image_size),
        train_loader_factory=train_loader_factory if method_obj.uses_real_data else None,
        end_epoch=end_epoch,
        log=log,
        samples=shard_set,
        resume=checkpoints,
    )
    method_obj.run(ctx)
    if not history:
        raise RuntimeError(f"method {method!r} finished without evaluating an epoch")
    final_probe = evaluate(student, probe)
    if round(final_probe["top1"] * final_probe["n"] / 100) != history[-1]["probe_correct"]:
        raise RuntimeError(f"method {method!r} changed the model after its last evaluated epoch")
    student = student.to(memory_format=torch.contiguous_format).eval()
    ckpt = {
        "arch": fp_ckpt["arch"],
        "dataset": info.name,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size,
        "quant": quant_cfg.to_dict(),
        "state_dict": {k: v.cpu() for k, v in student.state_dict().items()},
        "method": method,
        "method_cfg": method_obj.config_dict(),
        "seed": seed,
    }
    result = {
        "method": method,
        "seed": seed,
        "quant": quant_cfg.to_dict(),
        "method_cfg": asdict(method_obj.cfg),
        "history": history,
        "wall_time_s": timer(),
        "fp_test_top1": fp_ckpt.get("test_top1"),
        "resumed_from_epoch": checkpoints.resumed_from,
    }
    result["probe_runtime"] = {"device": str(dev), "threads": torch.get_num_threads()}

    def write_history(tmp_model: Path) -> None:
        # evaluate checks model.pt against this hash (exact), then re-tests it on the probe images
        result["model_sha256"] = sha256_file(tmp_model)
        try:
            tmp_history.write_text(json_text(result))
        except OSError as e:  # name the file that failed, not the checkpoint being published
            raise OutputError(
                f"{out_history}: cannot write ({os_reason(e)}); no partial file was left"
            ) from e

    with atomic_path(out_history) as tmp_history:  # both or neither: history.json is published last
        save_checkpoint(out_model, ckpt, before_publish=write_history)
    checkpoints.clear()
    tracker.log_metrics({"wall_time_s": result["wall_time_s"]})
    tracker.log_artifact(out_history)
    tracker.log_artifact(out_model, "checkpoint")
    return result
