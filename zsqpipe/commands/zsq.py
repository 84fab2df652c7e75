"""Commands of the zero-shot quantization pipeline: data -> fp-model -> synthesize -> quantize -> evaluate ->
aggregate."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from zsqpipe.commands import (
    EXISTING,
    MANIFEST,
    PATH,
    TABLE_OUTPUTS,
    echo,
    job_command,
    options,
    parse_json,
    table_command,
)

FP = (
    ("--fp", "fp_ckpt"),
    {"type": EXISTING, "required": True, "help": "FP checkpoint from `zsqpipe fp-model`."},
)


@job_command("data", device=False, threads=None)
@click.option(
    "--dataset", required=True, help="Registered dataset: fashion_mnist, cifar10, cifar100, imagenet."
)
@click.option(
    "--params", "params_json", default="{}", help="Data config as JSON (data_dir, allow_download, ...)."
)
@click.option("--out", type=PATH, required=True, help="Manifest to write (JSON).")
def data_cmd(open_job, dataset, params_json, out):
    """Locate and verify DATASET, fix the seeded validation split, write a manifest."""
    from zsqpipe.config import DataConfig, from_dict
    from zsqpipe.stages.data import prepare_data

    params = parse_json(params_json, "--params")
    cfg = from_dict(DataConfig, params, "data")
    with open_job(params) as job:
        m = prepare_data(dataset, cfg, out)
        job.tracker.log_params({"dataset": dataset, "data": params})
        job.tracker.log_metrics({k: m[k] for k in ("n_train", "n_val", "n_test")})
        job.tracker.log_artifact(out)
        echo(f"{dataset}: {m['n_train']} train / {m['n_val']} val / {m['n_test']} test -> {out}")


@job_command("fp-model", resume="out_model")
@options(MANIFEST)
@click.option("--arch", required=True, help="Registered architecture (resnet20, resnet18, mobilenet_v2).")
@click.option("--params", "params_json", default="{}", help="FP recipe as JSON (see config fp_model).")
@click.option("--checkpoint", default="", help="Load this file instead of the params' checkpoint (the workflow "
              "passes the file it resolved; empty: the params' own).")
@click.option("--out-model", type=PATH, required=True)
@click.option("--out-metrics", type=PATH, required=True)
def fp_model_cmd(open_job, manifest, arch, params_json, checkpoint, out_model, out_metrics):
    """Train the full-precision model from scratch, or load a local checkpoint."""
    from dataclasses import replace

    from zsqpipe.config import FPConfig, from_dict
    from zsqpipe.stages.fp_model import run_fp_model

    params = parse_json(params_json, "--params")
    cfg = from_dict(FPConfig, params, "fp_model")
    if checkpoint:
        cfg = replace(cfg, checkpoint=checkpoint)
    with open_job(params) as job:
        run_fp_model(manifest, arch, cfg, out_model, out_metrics, job)


@job_command("synthesize")
@options(FP)
@click.option("--synthesizer", required=True, help="Synthesizer name (hast, zeroq, intraq, ...).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="The synthesizer's settings as JSON.")
@click.option("--out", type=PATH, required=True, help="Output folder: shard-*.parquet + manifest.json.")
def synthesize_cmd(open_job, fp_ckpt, synthesizer, seed, params_json, out):
    """Synthesize samples from the FP model alone (no real data) and write verified Parquet shards."""
    from zsqpipe.stages.synthesize import run_synthesize

    params = parse_json(params_json, "--params")
    with open_job({"synthesizer": synthesizer, "cfg": params, "seed": seed}) as job:
        run_synthesize(fp_ckpt, synthesizer, params, seed, out, job)


@job_command("generator-warmup")
@options(FP)
@click.option("--spec", "spec_json", required=True,
              help="The warm-up's settings as JSON (zsqpipe.warmups.warmup_spec: kind + the method's generator settings).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=PATH, required=True, help="The recorded warm-up (.pt): batches + generator state.")
def generator_warmup_cmd(open_job, fp_ckpt, spec_json, seed, out):
    """Train a generator on the FP model alone (GDFQ/Qimera warm-up, HAST/IntraQ calibration) and record it."""
    from zsqpipe.stages.warmup import run_generator_warmup

    spec = parse_json(spec_json, "--spec")
    with open_job({"spec": spec, "seed": seed}) as job:
        run_generator_warmup(fp_ckpt, spec, seed, out, job)


@job_command("quantize", resume="out_model")
@options(FP, MANIFEST)
@click.option("--method", required=True, help="Method name (real, ptq, ...).")
@click.option("--weight-bits", type=int, required=True, help="Weight bits.")
@click.option("--act-bits", type=int, required=True, help="Activation bits.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--quant-params", default="{}", help="QuantConfig fields as JSON (bits come from --weight-bits/--act-bits)."
)
@click.option("--method-params", default="{}", help="The method's hyperparameters as JSON.")
@click.option("--samples", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of synthetic samples from `zsqpipe synthesize` (methods that train on them).")  # fmt: skip
@click.option("--warmup", type=EXISTING, default=None,
              help="Generator warm-up from `zsqpipe generator-warmup` to replay (gdfq, qimera, hast, intraq); "
                   "without it the method trains its generator itself, with the same result.")  # fmt: skip
@click.option("--lr-reference", type=EXISTING, default=None,
              help="history.json of the TALR cell an LR-matched control matches (methods.real.latent_lr_from).")
@click.option("--inputs-seed", type=click.IntRange(min=0), default=None,
              help="Seed that --samples and --warmup were made with, if not --seed (variants.<v>.inputs_seed): "
                   "holds the inputs fixed while the fine-tuning seed varies.")  # fmt: skip
@click.option("--samples-seed", type=click.IntRange(min=0), default=None,
              help="Seed that --samples were made with, over --inputs-seed (variants.<v>.samples_seed).")
@click.option("--warmup-seed", type=click.IntRange(min=0), default=None,
              help="Seed that --warmup was recorded with, over --inputs-seed (variants.<v>.warmup_seed).")
@click.option("--out-model", type=PATH, required=True)
@click.option("--out-history", type=PATH, required=True)
def quantize_cmd(open_job, fp_ckpt, manifest, method, weight_bits, act_bits, seed, quant_params, method_params, samples,
                 warmup, lr_reference, inputs_seed, samples_seed, warmup_seed, out_model, out_history):  # fmt: skip
    """Quantize the FP model and calibrate / fine-tune it with METHOD."""
    from zsqpipe.quant import QuantConfig
    from zsqpipe.stages.quantize import run_quantize

    q = {**parse_json(quant_params, "--quant-params"), "weight_bits": weight_bits, "act_bits": act_bits}
    mcfg = parse_json(method_params, "--method-params")
    with open_job({"quant": q, "method": method, "cfg": mcfg, "seed": seed}) as job:
        run_quantize(fp_ckpt, manifest, method, mcfg, QuantConfig.from_dict(q), seed, out_model, out_history,
                     samples=samples, job=job, warmup=warmup, lr_reference=lr_reference,
                     inputs_seed=inputs_seed, samples_seed=samples_seed, warmup_seed=warmup_seed)  # fmt: skip


@job_command("evaluate")
@click.option("--model", "model_path", type=EXISTING, required=True, help="Quantized model from `quantize`.")
@click.option("--history", type=EXISTING, required=True, help="history.json from `quantize`.")
@options(MANIFEST)
@click.option("--cell", "cell_json", required=True,
              help='Identity of the result as JSON: {"dataset", "arch", "method", "weight_bits", "act_bits", "seed"}.')  # fmt: skip
@click.option("--out", type=PATH, required=True, help="metrics.json to write.")
def evaluate_cmd(open_job, model_path, history, manifest, cell_json, out):
    """Test a quantized model; write top-1/top-5, last/best-epoch accuracy, size and BitOPs."""
    from zsqpipe.stages.evaluate import run_evaluate

    cell = parse_json(cell_json, "--cell")
    with open_job(cell) as job:
        run_evaluate(model_path, history, manifest, out, cell, job)


@table_command("aggregate", "metrics")
@click.argument("metrics", nargs=-1, type=EXISTING, required=True)
@options(*TABLE_OUTPUTS)
@click.option("--title", default="zsqpipe results", show_default=True)
@click.option("--paper", "paper_json", default="{}",
              help='Published top-1 as JSON {dataset: {arch: {method: {"w4a4": value}}}}: a "paper" column.')  # fmt: skip
@click.option("--reference", default=None,
              help="A method of the table: every other row gets the paired (same-seed) difference reference − row.")
def aggregate_cmd(metrics, out_csv, out_md, title, paper_json, reference):
    """Build a results table (CSV + Markdown) from METRICS files (mean ± std over seeds)."""
    from zsqpipe.stages.aggregate import run_aggregate

    paper = parse_json(paper_json, "--paper")
    return (
        metrics,
        functools.partial(run_aggregate, list(metrics), out_csv, out_md, title, paper, reference or None),
        (out_csv, out_md),
    )
