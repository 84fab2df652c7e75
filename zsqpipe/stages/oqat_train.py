"""Stage ``oqat-train``: train one OQAT supernet (docs/methods/oqat.md).

Without ``inherit_from``: a W=A=``cfg.bits`` LSQ-quantized supernet (NB201, or OFA with ``space: ofa_mbv3``), steps initialised with LSQ's init,
trained with SPOS uniform single-path sampling (:func:`zsqpipe.nas.oqat.train_oqat`). With ``inherit_from``
(a higher-bit ``oqat-train`` checkpoint): bit inheritance (:func:`zsqpipe.nas.oqat.inherit_bits`, rule
``cfg.inherit_rule``), then the same training at the lower bits (the fine-tuning recipe of config
``oqat.finetune``). Sanity metric: validation top-1 of the largest cell after BN recalibration, right after
inheritance (calibration only) and after training. Checkpoint, history and metrics are written atomically,
the metrics file last. With ``job.resume_root`` the training is checkpointed after every epoch outside the outputs
(``zsqpipe.resume``); a rerun after a kill continues from the last epoch with the result of an uninterrupted run.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from zsqpipe.data import make_loader
from zsqpipe.engine import Timer
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.nas.oqat import (
    OQATTrainConfig,
    build_oqat_supernet,
    inherit_bits,
    init_step_sizes,
    oqat_space,
    step_sizes,
    subnet_accuracy,
    train_oqat,
)
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.groundtruth_io import first_images
from zsqpipe.stages.oqat_io import load_oqat_supernet, save_oqat_supernet
from zsqpipe.stages.training import TrainingRun

SAME_AS_PARENT = ("space", "C", "N", "ofa", "block_input_quant", "weight_quantizer", "bn_affine")


def _inherit(inherit_from: Path, cfg: OQATTrainConfig, info, dev, init_x, bn_batches, val, log):
    """Bit inheritance from a higher-bit parent supernet: ``(model, record of what was inherited)``."""
    parent, pck = load_oqat_supernet(inherit_from, dev)
    if pck["dataset"] != info.name:
        raise ConfigError(f"oqat-train: {inherit_from} was trained on {pck['dataset']!r}, not {info.name!r}")
    for key in SAME_AS_PARENT:
        if pck["config"][key] != getattr(cfg, key):
            raise ConfigError(f"oqat.train.{key}: {cfg.to_dict()[key]!r}, but the parent supernet "
                              f"{inherit_from} has {pck['config'][key]!r}")  # fmt: skip
    parent_steps = step_sizes(parent)
    model = inherit_bits(parent, cfg, cfg.bits, cfg.inherit_rule, init_x)
    child_steps = step_sizes(model)
    ratio = [float((child_steps[k] / v).mean()) for k, v in parent_steps.items()]
    inherited = {
        "path": str(inherit_from),
        "sha256": sha256_file(inherit_from),
        "bits": int(pck["bits"]),
        "rule": cfg.inherit_rule,
        "mean_step_ratio": sum(ratio) / max(len(ratio), 1),
        "val_top1_largest": subnet_accuracy(model, oqat_space(cfg).largest, bn_batches, val),
    }
    log(f"inherited w{pck['bits']} -> w{cfg.bits} ({cfg.inherit_rule}; steps x{inherited['mean_step_ratio']:.3f}): "
        f"largest cell val top-1 {inherited['val_top1_largest']:.2f} before fine-tuning")  # fmt: skip
    return model, inherited


def run_oqat_train(
    manifest: Path,
    cfg: OQATTrainConfig,
    out_model: Path,
    out_history: Path,
    out_metrics: Path,
    inherit_from: Path | None = None,
    job: Job | None = None,
) -> dict:
    job = job or Job()
    log = job.log
    timer = Timer()
    key = {"oqat": cfg.to_dict(), "data_manifest_sha256": sha256_file(manifest),
           "parent_sha256": sha256_file(inherit_from) if inherit_from is not None else None}  # fmt: skip
    run = TrainingRun(job, "oqat_train", key, out_model, cfg.seed)
    run.timer, dev = timer, run.device
    data = load_prepared(manifest)
    info = data.info
    job.tracker.log_params({"dataset": info.name, "oqat": cfg.to_dict(), "device": str(dev),
                            "inherit_from": str(inherit_from) if inherit_from else None})  # fmt: skip

    # fixed batches: step-size init, BN recalibration and the validation check (no augmentation)
    fixed = make_loader(data.train, info, cfg.batch_size, train=True, seed=cfg.seed + 1000, device=dev,
                        augment=False)  # fmt: skip
    init_x = [x for x, _ in islice(fixed, cfg.init_batches)]
    bn_batches = list(islice(fixed, cfg.bn_batches))
    val = list(make_loader(first_images(data.val, cfg.val_images), info, cfg.eval_batch_size, train=False,
                           device=dev))  # fmt: skip
    inherited = None
    if inherit_from is not None:
        model, inherited = _inherit(inherit_from, cfg, info, dev, init_x, bn_batches, val, log)
        job.tracker.log_metrics({"inherited_val_top1_largest": inherited["val_top1_largest"]})
    else:
        model = build_oqat_supernet(cfg, info.in_channels, info.num_classes).to(dev)
        init_step_sizes(model, init_x)

    loader = make_loader(data.train, info, cfg.batch_size, train=True, seed=cfg.seed, device=dev,
                         augment=cfg.augment)  # fmt: skip
    history = train_oqat(model, loader, cfg, dev, log, run.log_epoch, run.checkpoints)
    run.add_restored_time(history)
    train_time = timer()
    val_largest = subnet_accuracy(model, oqat_space(cfg).largest, bn_batches, val)
    save_oqat_supernet(out_model, model, cfg, info, {"inherited_from": inherited})
    write_json(
        out_history, {"dataset": info.name, "bits": cfg.bits, "config": cfg.to_dict(), "history": history}
    )
    metrics = {
        "dataset": info.name, "bits": cfg.bits, "seed": cfg.seed, "config": cfg.to_dict(),
        "inherited_from": inherited, "val_top1_largest": val_largest, "val_images": sum(len(y) for _, y in val),
        "final_train_loss": history[-1]["train_loss"], "final_train_top1": history[-1]["train_top1"],
        "train_time_s": train_time, "wall_time_s": timer(), "device": str(dev),
        "resumed_from_epoch": run.resumed_from,
    }  # fmt: skip
    write_json(out_metrics, metrics)
    run.finish({"val_top1_largest": val_largest, "train_time_s": train_time, "wall_time_s": metrics["wall_time_s"]},
               [(out_metrics, None), (out_history, None), (out_model, "checkpoint")])  # fmt: skip
    log(f"oqat w{cfg.bits}a{cfg.bits} seed {cfg.seed}: largest cell val top-1 {val_largest:.2f} "
        f"(train {train_time:.0f}s)")  # fmt: skip
    return metrics
