"""Stage ``synthesize``: data-free samples from the FP model alone, written as verified Parquet shards.

No real data may be read: the synthesizer runs inside :func:`zsqpipe.data.forbid_real_data`, and the stage
gets no dataset manifest, only the FP checkpoint (which records the input shape and class count).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from zsqpipe.config import from_dict
from zsqpipe.data import forbid_real_data
from zsqpipe.data.shards import write_shards
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.io import sha256_file
from zsqpipe.job import Job
from zsqpipe.stages.model_io import model_from_checkpoint
from zsqpipe.zsq.synthesis import SynthContext, convergence, get_synthesizer, teacher_confidence


def run_synthesize(
    fp_checkpoint: Path,
    synthesizer: str,
    cfg: dict,
    seed: int,
    out_dir: Path,
    job: Job | None = None,
) -> dict:
    job = job or Job()
    tracker, log = job.tracker, job.log
    fn, cfg_cls = get_synthesizer(synthesizer)
    conf = from_dict(cfg_cls, cfg, f"synthesis.{synthesizer}")
    dev = resolve_device(job.device)
    setup_runtime(job.threads, seed)
    teacher, ckpt = model_from_checkpoint(fp_checkpoint, dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    shape = (ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"])
    tracker.log_params({"synthesizer": synthesizer, "seed": seed, "synthesis": asdict(conf)})
    timer = Timer()
    ctx = SynthContext(ckpt["num_classes"], shape, dev, torch.Generator().manual_seed(seed), log)
    with forbid_real_data(f"synthesizer {synthesizer!r}"):
        images, labels = fn(teacher, conf, ctx)
        confidence = teacher_confidence(teacher, images.to(dev), labels)
    seconds = timer()
    provenance = {
        "synthesizer": synthesizer,
        "config": asdict(conf),
        "dataset": ckpt["dataset"],
        "arch": ckpt["arch"],
        "fp_checkpoint_sha256": sha256_file(fp_checkpoint),
        "wall_time_s": seconds,
        "mean_teacher_confidence": float(confidence.mean()),
        "synthesis_steps": ctx.steps,  # per batch: < iters where stop_drop stopped it (docs/budget.md's rule)
        "synthesis_bn_loss": convergence(ctx.bn_traces, ctx.steps),
    }
    manifest = write_shards(out_dir, images, labels, 1.0 - confidence, synthesizer, seed,
                            getattr(conf, "shard_size", 1024), provenance)  # fmt: skip
    drop = provenance["synthesis_bn_loss"]["drop_last_100"]
    tracker.log_metrics({"count": len(images), "wall_time_s": seconds,
                         "mean_teacher_confidence": provenance["mean_teacher_confidence"],
                         **({"bn_loss_drop_last_100": drop} if drop is not None else {})})  # fmt: skip
    tracker.log_artifact(out_dir / "manifest.json")
    log(f"{synthesizer}: {len(images)} samples in {seconds:.0f}s, mean p_teacher {confidence.mean():.3f}"
        + (f", BN loss fell {100 * drop:.1f} % over the last 100 steps" if drop is not None else ""))
    return manifest
