"""Stages ``export``, ``deploy-eval`` and ``deploy-latency``: the quantized model on onnxruntime's integer kernels.

- ``run_export``: model.pt -> model.onnx (QDQ, integer weights, BatchNorm folded; zsqpipe/deploy/onnx_export.py),
  model_fp32.onnx (the same weights in float, no quantizer) and export.json (how each conv/linear runs, the
  kernels of onnxruntime's optimized graph, file sizes);
- ``run_deploy_eval``: the whole test set through the integer ONNX model and the PyTorch fake-quantized one:
  ``int_top1``, ``fake_top1`` and the share of images whose prediction differs;
- ``run_deploy_latency``: median latency (batch 1 and 256; 1 and 2 threads) of the integer ONNX, the FP32 ONNX
  and the PyTorch fake-quantized model. Latency depends on the graph, not on its weights: one cell per
  (dataset, arch, bits) is timed (docs/deploy.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zsqpipe.engine import setup_runtime
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_json, write_table
from zsqpipe.job import Job
from zsqpipe.stages.common import eval_loader
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.model_io import model_from_checkpoint

EXPORT_MODES = ("exact", "qlinear")


def _input_shape(ckpt: dict) -> tuple[int, int, int]:
    return (ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"])


def run_export(
    model_path: Path,
    out_onnx: Path,
    out_fp32: Path,
    out_report: Path,
    mode: str = "exact",
    dataset: str | None = None,
    job: Job | None = None,
) -> dict:
    """Export one quantized cell; ``mode``: ``exact`` (convs with a quantized input and output as ConvInteger +
    float requantization: the fake-quant arithmetic) or ``qlinear`` (QDQ with an int32 bias, fused by
    onnxruntime into QLinearConv: what quantization toolchains deploy; docs/deploy.md). ``dataset``: the model
    reads that data set's normalized 8-bit pixels, so its first conv runs as ConvInteger on them (None: float)."""
    from zsqpipe.data.datasets import dataset_info
    from zsqpipe.deploy import PixelInput, export_float_onnx, export_onnx
    from zsqpipe.deploy.runtime import kernel_counts

    job = job or Job()
    tracker, log = job.tracker, job.log
    setup_runtime(1, 0)
    model, ckpt = model_from_checkpoint(model_path, torch.device("cpu"))
    if ckpt.get("quant") is None:
        raise ConfigError(
            f"{model_path}: an FP model; export takes a quantized model.pt of `zsqpipe quantize`"
        )
    shape = _input_shape(ckpt)
    pixels = None
    if dataset is not None:
        info = dataset_info(dataset)
        if (info.in_channels, info.image_size) != shape[:2]:
            raise ConfigError(f"{model_path}: a {shape[1]}px {shape[0]}-channel model, but dataset {dataset!r} "
                              f"has {info.image_size}px {info.in_channels}-channel images")  # fmt: skip
        pixels = PixelInput(info.mean, info.std)
    report = export_onnx(model, shape, out_onnx, mode=mode, pixels=pixels)
    export_float_onnx(model, shape, out_fp32)
    kernels = kernel_counts(out_onnx)
    out = {
        "mode": mode,
        "dataset": dataset,
        "opset": report.opset,
        "layers": [vars(layer) for layer in report.layers],
        "act_quantizers": report.act_quantizers,
        "kernels": kernels,
        "float_kernels_fp32": kernel_counts(out_fp32)["float_kernels"],
        "onnx_bytes": Path(out_onnx).stat().st_size,
        "onnx_fp32_bytes": Path(out_fp32).stat().st_size,
    }
    write_json(out_report, out)
    floats = [f"{layer.name} ({layer.reason})" for layer in report.float_layers]
    tracker.log_params({"mode": mode, "opset": report.opset})
    tracker.log_metrics({"integer_kernels": kernels["integer_kernels"], "float_kernels": kernels["float_kernels"],
                         "onnx_bytes": out["onnx_bytes"], "onnx_fp32_bytes": out["onnx_fp32_bytes"]})  # fmt: skip
    tracker.log_artifact(out_report)
    log(f"{out_onnx}: {kernels['integer_kernels']} integer / {kernels['float_kernels']} float conv+matmul kernels "
        f"after onnxruntime's fusions; float layers: {', '.join(floats) or 'none'}")  # fmt: skip
    return out


def _test_batches(manifest: Path):
    data = load_prepared(manifest)
    loader = eval_loader(data.test, data.info, 1000, torch.device("cpu"))
    return list(loader)


def run_deploy_eval(
    model_path: Path,
    onnx_path: Path,
    dataset_manifest: Path,
    out: Path,
    cell: dict,
    job: Job | None = None,
) -> dict:
    """Top-1 of the integer ONNX model and of the fake-quantized PyTorch model on the whole test set, and the
    share of test images on which their predictions differ."""
    from zsqpipe.deploy.runtime import predict_onnx, session

    job = job or Job()
    tracker, log = job.tracker, job.log
    threads = job.threads or 1  # onnxruntime and torch alike (1 unless the job says otherwise)
    setup_runtime(threads, 0)
    model, _ = model_from_checkpoint(model_path, torch.device("cpu"))
    model = model.to(memory_format=torch.channels_last)  # as quantize/evaluate test it
    batches = _test_batches(dataset_manifest)
    labels = torch.cat([y for _, y in batches]).numpy()
    with torch.inference_mode():
        fake = np.concatenate([model(x).argmax(1).numpy() for x, _ in batches])
    sess = session(onnx_path, threads)
    ints = predict_onnx(sess, (x.contiguous() for x, _ in batches))
    n = len(labels)
    metrics = {
        **cell,
        "n": n,
        "fake_top1": 100.0 * float((fake == labels).mean()),
        "int_top1": 100.0 * float((ints == labels).mean()),
        "disagree_pct": 100.0 * float((fake != ints).mean()),
        "onnx_bytes": Path(onnx_path).stat().st_size,
    }
    metrics["int_minus_fake"] = metrics["int_top1"] - metrics["fake_top1"]
    write_json(out, metrics)
    tracker.log_params(cell)
    tracker.log_metrics({k: v for k, v in metrics.items() if k not in cell})
    tracker.log_artifact(out)
    log(f"{cell}: int {metrics['int_top1']:.2f}% vs fake-quant {metrics['fake_top1']:.2f}% on {n} test images, "
        f"{metrics['disagree_pct']:.2f}% of predictions differ")  # fmt: skip
    return metrics


def run_deploy_latency(
    model_path: Path,
    onnx_path: Path,
    fp32_path: Path,
    out: Path,
    key: dict,
    batch_sizes: tuple[int, ...] = (1, 256),
    thread_counts: tuple[int, ...] = (1, 2),
    runs: int = 20,
    job: Job | None = None,
) -> dict:
    """Median latency (ms, ``runs`` runs after 3 warm-up runs) of the integer ONNX, FP32 ONNX and PyTorch
    fake-quantized model on random inputs of the model's shape."""
    from zsqpipe.deploy.runtime import onnx_latency_ms, torch_latency_ms

    job = job or Job()
    tracker, log = job.tracker, job.log
    setup_runtime(max(thread_counts), 0)
    model, ckpt = model_from_checkpoint(model_path, torch.device("cpu"))
    model = model.to(memory_format=torch.channels_last)
    rows = []
    for bs in batch_sizes:
        x = torch.randn(bs, *_input_shape(ckpt), generator=torch.Generator().manual_seed(0))
        for t in thread_counts:
            row = {"batch": bs, "threads": t,
                   "int_onnx_ms": onnx_latency_ms(onnx_path, x, t, runs),
                   "fp32_onnx_ms": onnx_latency_ms(fp32_path, x, t, runs),
                   "torch_fake_ms": torch_latency_ms(model, x.contiguous(memory_format=torch.channels_last), t, runs)}  # fmt: skip
            row["int_vs_fp32"] = row["int_onnx_ms"] / row["fp32_onnx_ms"]
            rows.append(row)
            log(f"batch {bs}, {t} thread(s): int {row['int_onnx_ms']:.2f} ms, FP32 {row['fp32_onnx_ms']:.2f} ms, "
                f"PyTorch fake-quant {row['torch_fake_ms']:.2f} ms")  # fmt: skip
    result = {**key, "runs": runs, "latency": rows, "source": str(model_path)}
    write_json(out, result)
    tracker.log_params(key)
    tracker.log_metrics({f"{k}_b{r['batch']}_t{r['threads']}": r[k] for r in rows
                         for k in ("int_onnx_ms", "fp32_onnx_ms", "torch_fake_ms")})  # fmt: skip
    tracker.log_artifact(out)
    return result


DEPLOY_NOTE = (
    "fake-quant = the PyTorch fake-quantized model (the number every table reports: test top-1 after the last "
    "epoch); int = the same model exported to ONNX and run by onnxruntime (CPU) on integer kernels, whole test "
    "set; |int - fake| max = the largest difference over seeds; differ = test images whose prediction differs "
    "(mean over seeds); integer kernels = convs/linears onnxruntime runs on integers after its graph "
    "optimizations, of all convs/linears (the rest: float layers, named in export.json); size = ONNX file, "
    "integer vs FP32 export of the same weights; latency = median of the runs, integer ONNX / FP32 ONNX "
    "(< 1: integer faster) and PyTorch fake-quant / FP32 ONNX, measured once per dataset/arch/bits."
)


def run_deploy_table(
    deploy_paths: list[Path],
    export_paths: list[Path],
    latency_paths: list[Path],
    out_csv: Path,
    out_md: Path,
    title: str = "Integer deployment (onnxruntime, CPU)",
) -> pd.DataFrame:
    """deploy.csv: per dataset x arch x method x bits, fake-quant vs integer top-1, disagreement, kernels,
    size (mean over seeds) and the (dataset, arch, bits) latency ratios."""
    if len(deploy_paths) != len(export_paths) or not deploy_paths:
        raise IntegrityError(
            f"deploy-table: expected one export.json per deploy.json, got {len(export_paths)} and {len(deploy_paths)}"
        )
    rows = []
    for dp, ep in zip(deploy_paths, export_paths, strict=True):
        d, e = read_json(dp), read_json(ep)
        missing = [
            k for k in ("dataset", "arch", "method", "weight_bits", "act_bits", "seed", "int_top1") if k not in d
        ]
        if missing:
            raise IntegrityError(f"{dp}: deploy file lacks {missing}")
        k = e["kernels"]
        rows.append({**d, "integer_kernels": k["integer_kernels"], "float_kernels": k["float_kernels"],
                     "onnx_fp32_bytes": e["onnx_fp32_bytes"], "mode": e["mode"]})  # fmt: skip
    df = pd.DataFrame(rows)
    lat = {}
    for p in latency_paths:
        r = read_json(p)
        lat[(r["dataset"], r["arch"], r["weight_bits"], r["act_bits"])] = r["latency"]
    out = []
    keys = ["dataset", "arch", "method", "weight_bits", "act_bits"]
    for key, g in df.groupby(keys, sort=True):
        row = dict(zip(keys, key, strict=True))
        row["bits"] = f"W{row['weight_bits']}A{row['act_bits']}"
        row["mode"] = ",".join(sorted(set(g["mode"])))
        row["n_seeds"], row["seeds"] = len(g), " ".join(str(s) for s in sorted(g["seed"]))
        for col in ("fake_top1", "int_top1"):
            row[f"{col}_mean"] = float(g[col].mean())
            row[f"{col}_std"] = float(g[col].std(ddof=1)) if len(g) > 1 else np.nan
        row["abs_int_minus_fake_max"] = float((g["int_top1"] - g["fake_top1"]).abs().max())
        row["disagree_pct_mean"] = float(g["disagree_pct"].mean())
        row["integer_kernels"], row["float_kernels"] = (
            int(g["integer_kernels"].max()),
            int(g["float_kernels"].max()),
        )
        row["onnx_kib"], row["onnx_fp32_kib"] = (
            g["onnx_bytes"].mean() / 1024,
            g["onnx_fp32_bytes"].mean() / 1024,
        )
        for r in lat.get((row["dataset"], row["arch"], row["weight_bits"], row["act_bits"]), []):
            tag = f"b{r['batch']}_t{r['threads']}"
            row[f"int_vs_fp32_{tag}"] = r["int_onnx_ms"] / r["fp32_onnx_ms"]
            row[f"torch_vs_fp32_{tag}"] = r["torch_fake_ms"] / r["fp32_onnx_ms"]
            row[f"int_ms_{tag}"] = r["int_onnx_ms"]
        out.append(row)
    table = pd.DataFrame(out)
    write_table(table, out_csv, out_md, deploy_markdown(table, title))
    return table


def deploy_markdown(table: pd.DataFrame, title: str) -> str:
    tags = sorted({c.removeprefix("int_vs_fp32_") for c in table.columns if c.startswith("int_vs_fp32_")},
                  key=lambda t: (int(t.split("_")[0][1:]), t))  # fmt: skip
    cols = ["dataset", "arch", "method", "bits", "seeds", "fake-quant", "int", "|int - fake| max", "differ %",
            "integer kernels", "size KiB int / FP32"] + [f"latency int/FP32 {t}" for t in tags]  # fmt: skip
    rows = []
    for _, r in table.iterrows():
        rows.append([
            r["dataset"], r["arch"], r["method"], r["bits"], f"{r['n_seeds']} ({r['seeds']})",
            mean_pm_std(r["fake_top1_mean"], r["fake_top1_std"]), mean_pm_std(r["int_top1_mean"], r["int_top1_std"]),
            f"{r['abs_int_minus_fake_max']:.2f}", f"{r['disagree_pct_mean']:.2f}",
            f"{r['integer_kernels']} / {r['integer_kernels'] + r['float_kernels']}",
            f"{r['onnx_kib']:.0f} / {r['onnx_fp32_kib']:.0f}",
        ] + [f"{r[f'int_vs_fp32_{t}']:.2f}" if f"int_vs_fp32_{t}" in r and not np.isnan(r[f"int_vs_fp32_{t}"]) else ""
             for t in tags])  # fmt: skip
    return "\n".join(markdown_table(title, [DEPLOY_NOTE], cols, rows)) + "\n"
