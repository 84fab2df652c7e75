"""Stage ``evaluate``: check a quantized model and write ``metrics.json``.

The test accuracy of the final model (top-1, and top-5 when there are >= 100 classes) is the one the
``quantize`` stage measured on the whole test set after its last epoch, on the same weights. Here the saved
checkpoint is checked against the SHA-256 that ``quantize`` recorded in ``history.json`` (a corrupt, truncated
or mismatched file is an error), rebuilt and re-tested on the first 1,000 test images. On the device and
thread count that trained it the count of correct images must be exactly the trained model's; elsewhere (a
cluster runs evaluate with other threads or another GPU model) float summation order may flip a few low-bit
levels, so up to 0.5 % of the probe images may differ (a wrongly rebuilt model misses by far more). Then model
size, MACs and bit-operations are counted, and the training history is summarised:

- ``last_top1``: the last epoch's test accuracy (honest);
- ``best_top1``: the best test accuracy over epochs (model selection on the test set, as GDFQ/IntraQ/HAST/ZAQ
  report it; labelled as such in every table);
- ``val_selected_top1``: test accuracy at the epoch with the best validation accuracy (honest selection).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zsqpipe.engine import evaluate, resolve_device, setup_runtime
from zsqpipe.errors import IntegrityError
from zsqpipe.io import read_json, sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.quant import count_bitops, model_size_bits
from zsqpipe.stages.common import split_test
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.model_io import model_from_checkpoint

EVAL_BATCH = 1000


def summarize_history(history: list[dict]) -> dict:
    if not history:
        raise IntegrityError("training history is empty")
    best = max(range(len(history)), key=lambda i: history[i]["test_top1"])
    vsel = max(range(len(history)), key=lambda i: history[i]["val_top1"])
    return {
        "last_top1": history[-1]["test_top1"],
        "best_top1": history[best]["test_top1"],
        "best_epoch": history[best]["epoch"],
        "val_selected_top1": history[vsel]["test_top1"],
        "val_selected_epoch": history[vsel]["epoch"],
        "epochs": len(history),
    }


def summary_scalars(summary: dict) -> dict[str, float]:
    """The numbers of a history's method ``summary`` ({section: {key: value}}) as flat ``<section>_<key>`` metrics
    (e.g. ``talr_lr_sum_mean``, ``talr_regulating_step_median``); per-layer dicts, traces and nulls are left out."""
    return {
        f"{section}_{key}": float(v)
        for section, values in summary.items() if isinstance(values, dict)
        for key, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }  # fmt: skip


def run_evaluate(
    model_path: Path,
    history_path: Path,
    dataset_manifest: Path,
    out_metrics: Path,
    cell: dict,
    job: Job | None = None,
) -> dict:
    job = job or Job()
    tracker, log = job.tracker, job.log
    setup_runtime(job.threads, 0)
    dev = resolve_device(job.device)
    model, ckpt = model_from_checkpoint(model_path, dev)
    # same memory format as the quantize stage's evaluation: contiguous vs channels_last weights take
    # different conv kernels, and a float-rounding difference can flip a low-bit quantization level
    model = model.to(memory_format=torch.channels_last)
    hist = read_json(history_path)
    if hist.get("model_sha256") and sha256_file(model_path) != hist["model_sha256"]:
        raise IntegrityError(
            f"{model_path}: SHA-256 differs from the one quantize recorded in {history_path}"
        )
    data = load_prepared(dataset_manifest)
    info = data.info
    probe, _ = split_test(data.test, info, dev)
    checked = evaluate(model, probe)
    expected = hist["history"][-1]["probe_correct"]
    got = round(checked["top1"] * checked["n"] / 100)
    trained_on = hist.get("probe_runtime")
    same_runtime = trained_on == {"device": str(dev), "threads": torch.get_num_threads()}
    allowed = 0 if same_runtime or not hist.get("model_sha256") else max(1, checked["n"] // 200)
    if abs(got - expected) > allowed:
        raise IntegrityError(
            f"{model_path}: the saved model gets {got} of the first {checked['n']} test images right, "
            f"the trained model got {expected} ({history_path}; at most {allowed} may differ here)"
        )
    if got != expected:
        log(
            f"probe: {got} vs {expected} correct of {checked['n']} (trained on {trained_on}, checked on {dev} "
            f"with {torch.get_num_threads()} threads: float rounding, within the allowed {allowed})"
        )
    ops = count_bitops(model, (info.in_channels, info.image_size, info.image_size))
    summary = summarize_history(hist["history"])
    last = hist["history"][-1]
    metrics = {
        **cell,
        "top1": last["test_top1"],
        **({"top5": last["test_top5"]} if info.num_classes >= 100 else {}),
        **summary,
        **summary_scalars(hist.get("summary", {})),
        "fp_top1": hist.get("fp_test_top1"),
        "model_size_bits": model_size_bits(model),
        "macs": sum(o.macs for o in ops),
        "bitops": sum(o.bitops for o in ops),
        "wall_time_s": hist["wall_time_s"],
        "checkpoint_verified_on": checked["n"],
        "checkpoint_probe_difference": got - expected,
    }
    write_json(out_metrics, metrics)
    tracker.log_params(cell)
    tracker.log_metrics({k: v for k, v in metrics.items() if k not in cell})
    tracker.log_artifact(out_metrics)
    log(f"{cell}: top-1 {metrics['top1']:.2f}% (best {summary['best_top1']:.2f}); checkpoint verified")
    return metrics
