"""Commands of integer deployment (docs/deploy.md): export -> deploy-eval / deploy-latency -> deploy-table."""

from __future__ import annotations

import functools

import click

from zsqpipe.commands import (
    EXISTING,
    MANIFEST,
    PATH,
    TABLE_OUTPUTS,
    job_command,
    options,
    parse_json,
    table_command,
    threads_option,
)
from zsqpipe.errors import ConfigError

MODEL = (
    ("--model", "model_path"),
    {"type": EXISTING, "required": True, "help": "Quantized model.pt from `quantize`."},
)
ONNX = (
    ("--onnx", "onnx_path"),
    {"type": EXISTING, "required": True, "help": "model.onnx from `zsqpipe export`."},
)


@job_command("export", device=False, threads=None)
@options(MODEL)
@click.option("--out", type=PATH, required=True, help="model.onnx to write (QDQ, integer weights).")
@click.option("--out-fp32", type=PATH, required=True, help="model_fp32.onnx: the same weights in float.")
@click.option("--report", type=PATH, required=True, help="export.json: how each layer runs, kernels, sizes.")
@click.option("--mode", type=click.Choice(["exact", "qlinear"]), default="exact", show_default=True,
              help="exact: ConvInteger + float requantization (the fake-quant arithmetic); qlinear: QDQ with an "
              "int32 bias that onnxruntime fuses into QLinearConv (docs/deploy.md).")  # fmt: skip
@click.option("--dataset", default=None,
              help="The data set the model reads: its inputs are normalized 8-bit pixels, so the first conv runs "
              "as ConvInteger on the pixels; omitted, the first conv stays float.")  # fmt: skip
def export_cmd(open_job, model_path, out, out_fp32, report, mode, dataset):
    """Export a quantized model to ONNX (QDQ, opset 21) for onnxruntime's integer kernels."""
    from zsqpipe.stages.deploy import run_export

    with open_job({"mode": mode, "dataset": dataset}) as job:
        run_export(model_path, out, out_fp32, report, mode, dataset, job)


@job_command("deploy-eval", device=False, threads=threads_option(1, "torch and onnxruntime threads."))
@options(MODEL, ONNX)
@options(MANIFEST)
@click.option("--cell", "cell_json", required=True, help="Identity of the result as JSON (as `evaluate`).")
@click.option("--out", type=PATH, required=True, help="deploy.json to write.")
def deploy_eval_cmd(open_job, model_path, onnx_path, manifest, cell_json, out):
    """Test the integer ONNX model and the fake-quantized model on the whole test set; count disagreements."""
    from zsqpipe.stages.deploy import run_deploy_eval

    cell = parse_json(cell_json, "--cell")
    with open_job(cell) as job:
        run_deploy_eval(model_path, onnx_path, manifest, out, cell, job)


def _int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated positive integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise ConfigError(f"{what}: expected comma-separated positive integers, got {value!r}")
    return out


@job_command("deploy-latency", device=False, threads=None)
@options(MODEL, ONNX)
@click.option("--onnx-fp32", "fp32_path", type=EXISTING, required=True, help="model_fp32.onnx from `export`.")
@click.option("--key", "key_json", required=True,
              help='What is timed, as JSON: {"dataset", "arch", "weight_bits", "act_bits"}.')  # fmt: skip
@click.option("--out", type=PATH, required=True, help="latency.json to write.")
@click.option("--batch-sizes", default="1,256", show_default=True, help="Comma-separated batch sizes.")
@click.option("--thread-counts", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option(
    "--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs (median)."
)
def deploy_latency_cmd(
    open_job, model_path, onnx_path, fp32_path, key_json, out, batch_sizes, thread_counts, runs
):
    """Median latency of the integer ONNX, FP32 ONNX and PyTorch fake-quantized model."""
    from zsqpipe.stages.deploy import run_deploy_latency

    key = parse_json(key_json, "--key")
    batches, threads = _int_list(batch_sizes, "--batch-sizes"), _int_list(thread_counts, "--thread-counts")
    with open_job({**key, "runs": runs}) as job:
        run_deploy_latency(model_path, onnx_path, fp32_path, out, key, batches, threads, runs, job)


@table_command("deploy-table", "deploy")
@click.option(
    "--deploy", "deploy_paths", multiple=True, type=EXISTING, required=True, help="deploy.json (repeat)."
)
@click.option("--export", "export_paths", multiple=True, type=EXISTING, required=True,
              help="export.json of the same cells, same order (repeat).")  # fmt: skip
@click.option("--latency", "latency_paths", multiple=True, type=EXISTING, help="latency.json (repeat).")
@options(*TABLE_OUTPUTS)
@click.option("--title", default="Integer deployment (onnxruntime, CPU)", show_default=True)
def deploy_table_cmd(deploy_paths, export_paths, latency_paths, out_csv, out_md, title):
    """Build deploy.csv/.md: fake-quant vs integer top-1, disagreement, kernels, size and latency ratios."""
    from zsqpipe.stages.deploy import run_deploy_table

    build = functools.partial(run_deploy_table, list(deploy_paths), list(export_paths), list(latency_paths),
                              out_csv, out_md, title)  # fmt: skip
    return deploy_paths, build, (out_csv, out_md)
