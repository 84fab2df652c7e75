"""Stage ``supernet-train``: train the NB201 supernet (SPOS or SPOS + CaLR + MS) for one seed, then rank the
ground-truth cells with it.

1. Train (:func:`zsqpipe.nas.supernet201.train_supernet`) on the training split of a ``data`` manifest
   (validation images held out); write the checkpoint (atomically) and the per-epoch history.
2. Score every cell of the ground-truth sample (``groundtruth`` files) with the supernet: top-1 on the first
   ``eval_images`` validation images (BN as configured: DYNAS' batch statistics, or running statistics
   recalibrated per cell on ``bn_batches`` training batches; :func:`~zsqpipe.nas.supernet201.evaluate_subnets`).
3. Rank quality (DYNAS protocol, ``train_spos.py``): Kendall tau-b between the supernet's validation accuracy
   and the ground-truth **test** accuracy over the sample, and the ground-truth test accuracy of the cell the
   supernet ranks best (the "Top-1 Acc." column). tau against the ground-truth validation accuracy is
   reported too. Table datasets (CIFAR-10/100) are ranked against all three NB201 datasets, as DYNAS does.

The metrics file is written last.
"""

from __future__ import annotations

import math
from pathlib import Path

from zsqpipe.data import make_loader
from zsqpipe.engine import Timer
from zsqpipe.errors import ConfigError
from zsqpipe.io import save_checkpoint, sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import DATASETS as NB201_DATASETS
from zsqpipe.nas.calr import METHODS, SupernetConfig
from zsqpipe.nas.ranking import kendall_tau, seed_agreement, subset_kendall
from zsqpipe.nas.supernet201 import build_supernet, evaluate_subnets, train_supernet
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.groundtruth_io import first_images, load_groundtruth
from zsqpipe.stages.training import TrainingRun


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def rank_quality(estimated: list[float], valid: list[float], test: list[float], archs: list[str]) -> dict:
    """tau (vs test), tau_valid (vs validation), top1 = test accuracy of the best-estimated cell, the sample's
    best test accuracy, and the best-estimated cell. tau is None (JSON null) where it is undefined: constant
    estimates or ground truths, e.g. an untrained supernet that predicts one class for every cell."""
    est = dict(zip(archs, estimated, strict=True))
    r = subset_kendall(est, dict(zip(archs, test, strict=True)), archs)
    best = max(range(len(archs)), key=lambda i: (estimated[i], -i))  # first on ties, as subset_kendall
    return {
        "tau": _finite(r["tau"]),
        "tau_valid": _finite(kendall_tau(estimated, valid)),
        "top1": r["top1_true"],
        "best_arch": archs[best],
        "sample_best_test": max(test),
        "n": r["n"],
    }


def _fmt(tau: float | None) -> str:
    return "undefined" if tau is None else f"{tau:.3f}"


def _check_groundtruth(gt: dict, cfg: SupernetConfig, dataset: str) -> None:
    if gt["dataset"] != dataset:
        raise ConfigError(f"supernet-train: ground truth is for {gt['dataset']!r}, the data for {dataset!r}")
    if gt["source"] == "trained" and (gt["config"]["C"], gt["config"]["N"]) != (cfg.C, cfg.N):
        raise ConfigError(
            f"supernet-train: ground truth trained with C={gt['config']['C']}, N={gt['config']['N']}, "
            f"the supernet has C={cfg.C}, N={cfg.N} (supernet.groundtruth follows supernet.train)"
        )


def _rank_groundtruth(model, gt: dict, data, cfg: SupernetConfig, dev, log) -> tuple[list, list, dict, str]:
    """The supernet's validation accuracy of every ground-truth cell (after BN recalibration), and the
    ranking quality against each available truth: ``(archs, estimated, truths, own truth)``."""
    info = data.info
    archs = [r["arch"] for r in gt["records"]]
    val = make_loader(first_images(data.val, cfg.eval_images), info, cfg.eval_batch_size, train=False,
                      device=dev)  # fmt: skip
    bn_loader = make_loader(data.train, info, cfg.batch_size, train=True, seed=cfg.seed, device=dev,
                            augment=False)  # fmt: skip
    estimated = evaluate_subnets(model, archs, bn_loader, val, cfg.bn_batches, dev, log)
    own = gt["table"] or info.name
    truths = {own: rank_quality(estimated, [r["valid_acc"] for r in gt["records"]],
                                [r["test_acc"] for r in gt["records"]], archs)}  # fmt: skip
    if gt["source"] == "nasbench201":
        for d in NB201_DATASETS:
            if d != own:
                truths[d] = rank_quality(estimated, [r["nb201"][f"{d}_valid"] for r in gt["records"]],
                                         [r["nb201"][f"{d}_test"] for r in gt["records"]], archs)  # fmt: skip
    return archs, estimated, truths, own


def _save_supernet(out_model: Path, model, cfg: SupernetConfig, info, label: str) -> None:
    save_checkpoint(out_model, {"kind": "nb201_supernet", "label": label, "dataset": info.name, "in_channels": info.in_channels,
                                "num_classes": info.num_classes, "image_size": info.image_size,
                                "config": cfg.to_dict(), "split_edge": cfg.resolved_split_edge(),
                                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}})  # fmt: skip


def run_supernet_train(
    manifest: Path,
    groundtruth: list[Path],
    cfg: SupernetConfig,
    out_model: Path,
    out_history: Path,
    out_metrics: Path,
    job: Job | None = None,
    label: str | None = None,
) -> dict:
    """Train the supernet of ``cfg``, then rank the ground-truth cells with it. ``label``: the name the run has
    in tables (a supernet.variants name; default the method)."""
    job = job or Job()
    log = job.log
    label = label or cfg.method
    if cfg.method not in METHODS:
        raise ConfigError(f"supernet.methods: {cfg.method!r} is not one of {list(METHODS)}")
    timer = Timer()
    gt = load_groundtruth(groundtruth)  # fail before hours of training, not after
    # the training does not depend on the ground truth, only on these
    key = {"supernet": cfg.to_dict(), "data_manifest_sha256": sha256_file(manifest)}
    run = TrainingRun(job, "supernet_train", key, out_model, cfg.seed)
    run.timer, dev = timer, run.device
    data = load_prepared(manifest)
    info = data.info
    _check_groundtruth(gt, cfg, info.name)
    job.tracker.log_params({"dataset": info.name, "supernet": cfg.to_dict(), "device": str(dev),
                            "n_archs": len(gt["records"]), "groundtruth_source": gt["source"]})  # fmt: skip
    model = build_supernet(cfg, info.in_channels, info.num_classes).to(dev)
    loader = make_loader(data.train, info, cfg.batch_size, train=True, seed=cfg.seed, device=dev,
                         augment=cfg.augment)  # fmt: skip
    history = train_supernet(model, loader, cfg, dev, log, run.log_epoch, run.checkpoints)
    run.add_restored_time(history)
    train_time = timer()
    _save_supernet(out_model, model, cfg, info, label)
    write_json(out_history, {"dataset": info.name, "config": cfg.to_dict(), "history": history})

    t_eval = Timer()
    archs, estimated, truths, own = _rank_groundtruth(model, gt, data, cfg, dev, log)
    eval_time = t_eval()
    subnets = [{"arch": a, "index": r["index"], "supernet_valid_acc": e, "gt_valid_acc": r["valid_acc"],
                "gt_test_acc": r["test_acc"]} for a, e, r in zip(archs, estimated, gt["records"], strict=True)]  # fmt: skip
    metrics = {
        "dataset": info.name, "method": label, "base_method": cfg.method, "seed": cfg.seed, "config": cfg.to_dict(),
        "split_edge": cfg.resolved_split_edge(), "n_archs": len(archs),
        "groundtruth": {"source": gt["source"], "truth": own, "sample": gt["sample"], "config": gt["config"],
                        "wall_time_s": gt["wall_time_s"], "seed_tau": seed_agreement(gt["records"])},
        "tau": truths[own]["tau"], "tau_valid": truths[own]["tau_valid"], "top1": truths[own]["top1"],
        "truths": truths, "subnets": subnets, "eval_images": len(first_images(data.val, cfg.eval_images)),
        "final_train_loss": history[-1]["train_loss"], "final_train_top1": history[-1]["train_top1"],
        "train_time_s": train_time, "eval_time_s": eval_time, "wall_time_s": timer(),
        "resumed_from_epoch": run.resumed_from, "device": str(dev),
    }  # fmt: skip
    write_json(out_metrics, metrics)
    summary = {"train_time_s": train_time, "eval_time_s": eval_time, "wall_time_s": metrics["wall_time_s"]}
    for d, t in truths.items():
        for k in ("tau", "tau_valid", "top1"):
            if t[k] is not None:
                summary[k if d == own else f"{k}_{d}"] = t[k]
    run.finish(summary, [(out_metrics, None), (out_history, None), (out_model, "checkpoint")])
    log(f"supernet {label} seed {cfg.seed} on {info.name}: Kendall tau {_fmt(metrics['tau'])} "
        f"(vs valid {_fmt(metrics['tau_valid'])}), top-1 of the best-ranked cell {metrics['top1']:.2f} "
        f"({len(archs)} cells; train {train_time:.0f}s, eval {eval_time:.0f}s)")  # fmt: skip
    return metrics
