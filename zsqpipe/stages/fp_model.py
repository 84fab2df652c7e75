"""Stage ``fp-model``: train the full-precision model from scratch, or load a local checkpoint ("fetch").

A loaded checkpoint may be a zsqpipe checkpoint, a plain ``state_dict`` (e.g. pytorchcv's
``resnet20_cifar10-*.pth``) or a dict with a ``state_dict``/``model`` entry. Either way the model's test
accuracy is measured and recorded.

With ``job.resume_root`` set, training is checkpointed after every epoch outside the outputs (``zsqpipe.resume``)
and a rerun after a kill continues from the last checkpoint, with the same result as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from zsqpipe.config import FPConfig
from zsqpipe.engine import Timer, evaluate, runtime_info
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.fp_training import train_fp
from zsqpipe.io import atomic_path, json_text, save_checkpoint, sha256_file, torch_load_checked
from zsqpipe.job import Job
from zsqpipe.models import create_model
from zsqpipe.stages.common import eval_loader
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.training import TrainingRun


def _load_external(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"fp_model.checkpoint: file {path} not found")
    obj = torch_load_checked(path, what="a PyTorch checkpoint")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in obj.items()})
    except (RuntimeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise IntegrityError(f"{path}: does not match the architecture: {first}") from e


def run_fp_model(
    dataset_manifest: Path,
    arch: str,
    cfg: FPConfig,
    out_model: Path,
    out_metrics: Path,
    job: Job | None = None,
) -> dict:
    job = job or Job()
    key = {"arch": arch, "fp": asdict(cfg), "data_manifest_sha256": sha256_file(dataset_manifest)}
    run = TrainingRun(job, "fp_model", key, out_model, cfg.seed, deterministic=cfg.deterministic)
    dev, log = run.device, job.log
    data = load_prepared(dataset_manifest)
    info = data.info
    model = create_model(
        arch, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size
    )
    job.tracker.log_params({"arch": arch, "dataset": info.name, "fp": asdict(cfg), "device": str(dev)})
    run.timer = Timer()  # the clock starts after the set-up
    history: list[dict] = []
    source = "trained"
    if cfg.checkpoint:
        _load_external(model, Path(cfg.checkpoint))
        source, checkpoint_sha = f"checkpoint:{cfg.checkpoint}", sha256_file(cfg.checkpoint)
        log(f"FP model loaded from {cfg.checkpoint} (sha256 {checkpoint_sha[:12]}); fp_model's training "
            "settings are unused (a null checkpoint entry trains)")
        model = model.to(dev)
    else:
        model = model.to(dev)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        history = train_fp(model, data, cfg, dev, job.tracker, log, run.checkpoints, run.timer)
    test = evaluate(model, eval_loader(data.test, info, cfg.eval_batch_size, dev, cfg.channels_last))
    if history:  # the model has not changed since the last epoch's validation
        val = {"top1": history[-1]["val_top1"]}
    else:
        val = evaluate(model, eval_loader(data.val, info, cfg.eval_batch_size, dev, cfg.channels_last))
    model = model.to(memory_format=torch.contiguous_format)
    metrics = {"dataset": info.name, "arch": arch, "source": source, "test_top1": test["top1"],
               "test_top5": test["top5"], "val_top1": val["top1"], "wall_time_s": run.timer(), "history": history,
               "num_params": sum(p.numel() for p in model.parameters()), "resumed_from_epoch": run.resumed_from,
               "runtime": runtime_info()}  # fmt: skip
    ckpt = {"arch": arch, "dataset": info.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "quant": None, "config": asdict(cfg), "test_top1": test["top1"]}  # fmt: skip
    if cfg.checkpoint:
        metrics["checkpoint_sha256"] = checkpoint_sha
    with atomic_path(out_metrics) as tmp_metrics:  # both or neither: fp_metrics.json is published last
        tmp_metrics.write_text(json_text(metrics))
        save_checkpoint(out_model, ckpt)
    run.finish({"final_test_top1": test["top1"], "final_val_top1": val["top1"], "wall_time_s": metrics["wall_time_s"]},
               [(out_metrics, None), (out_model, "checkpoint")])  # fmt: skip
    log(f"FP {arch} on {info.name}: test top-1 {test['top1']:.2f}%")
    return metrics
