"""``zsqpipe``: the command-line entry point; one thin command per pipeline stage.

Each command parses its options, calls the stage's pure function in ``zsqpipe.stages`` and maps a
:class:`~zsqpipe.errors.ZsqError` to a one-line message and exit status 1. Snakemake rules call these
commands with the rule's config slice as JSON (``--params``), so config changes are visible to Snakemake.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from pathlib import Path

import click

from zsqpipe import __version__
from zsqpipe.errors import ConfigError, ZsqError

PATH = click.Path(path_type=Path)
EXISTING = click.Path(path_type=Path, exists=True, dir_okay=False)


def _json(value: str | None, what: str) -> dict:
    if not value:
        return {}
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _log(msg: str) -> None:
    click.echo(msg)
    sys.stdout.flush()


def stage_command(fn):
    """Turn ZsqError into ``zsqpipe <command>: error: <message>`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ZsqError as e:
            ctx = click.get_current_context()
            click.echo(f"zsqpipe {ctx.info_name}: error: {e}", err=True)
            ctx.exit(1)

    return wrapper


def tracking_options(fn):
    """Options every tracked stage shares: the tracking file and the run's identity tags."""
    fn = click.option(
        "--tracking",
        type=EXISTING,
        default=None,
        help="tracking.json written by `zsqpipe tracking-init` (omit: no MLflow run).",
    )(fn)
    fn = click.option(
        "--rule", default="manual", show_default=True, help="Snakemake rule name (MLflow tag)."
    )(fn)
    fn = click.option("--wildcards", default="", help="Snakemake wildcards, 'k=v, ...' (MLflow tag).")(fn)
    fn = click.option("--log-file", type=PATH, default=None, help="This job's log, attached to the run.")(fn)
    return fn


def runtime_options(fn):
    fn = click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )(fn)
    fn = click.option("--threads", type=int, default=None, help="torch CPU threads (the rule's `threads`).")(
        fn
    )
    return fn


def resume_options(fn):
    """Epoch checkpoints of long stages (zsqpipe.resume); see :func:`_resume_root`."""
    fn = click.option(
        "--resume-root",
        type=PATH,
        default=None,
        help="Folder for epoch checkpoints, kept outside the outputs; a rerun resumes from the last one "
        "(default: .resume next to the output; the workflow uses results/.resume).",
    )(fn)
    fn = click.option("--no-resume", is_flag=True, help="Neither resume nor write epoch checkpoints.")(fn)
    return fn


def _resume_root(resume_root: Path | None, no_resume: bool, output: Path) -> Path | None:
    if no_resume:
        return None
    return resume_root if resume_root is not None else output.parent / ".resume"


@contextlib.contextmanager
def tracked_run(tracking, rule, wildcards, params: dict, log_file=None):
    """The job layer of every tracked command: one MLflow run named after the rule and wildcards (tags: rule,
    wildcards, a hash of ``params``), yielding its tracker; the job's log file is attached when the body
    succeeded (a failed body closes the run FAILED: ``Tracker.run``)."""
    from zsqpipe.io import sha256_json
    from zsqpipe.tracking import Tracker

    tracker = Tracker.from_file(tracking)
    tags = {"zsq.rule": rule, "zsq.wildcards": wildcards, "zsq.config_hash": sha256_json(params)[:16]}
    with tracker.run(f"{rule}[{wildcards}]" if wildcards else rule, tags):
        yield tracker
        if log_file:
            tracker.log_artifact(log_file, "logs")


def _table_run(kind: str, inputs, build, outputs, tracking, rule, wildcards, log_file) -> None:
    """The body of every table command: one MLflow run that builds the table (``build()`` returns it) from the
    ``inputs`` files (``kind``: what they are), logs their count and the rows, and attaches the written
    ``outputs`` (under ``tables/``) and the job's log."""
    with tracked_run(tracking, rule, wildcards, {kind: [str(p) for p in inputs]}, log_file) as tracker:
        table = build()
        tracker.log_params({f"n_{kind}": len(inputs), "rows": len(table)})
        for path in outputs:
            if path is not None:
                tracker.log_artifact(path, "tables")
        _log(f"{len(table)} rows -> {outputs[0]}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsqpipe")
def cli():
    """zsqpipe: zero-shot quantization and quantization-aware NAS, one command per pipeline stage.

    Normally run through Snakemake (`snakemake --cores 2 results/tables/hast.csv`); every command can also be
    run by hand. Stages: data -> fp-model -> quantize -> evaluate -> aggregate; NAS: search -> nas-table,
    groundtruth + supernet-train -> supernet-table.
    """


@cli.command("tracking-init")
@click.option("--out", type=PATH, required=True, help="Where to write tracking.json.")
@click.option("--experiment", default="zsqpipe", show_default=True, help="MLflow experiment name.")
@click.option("--enabled/--disabled", default=True, show_default=True, help="Turn MLflow tracking on or off.")
@click.option(
    "--results-dir",
    type=PATH,
    default=Path("results"),
    show_default=True,
    help="Default SQLite store lives in RESULTS_DIR/mlflow (ignored if MLFLOW_TRACKING_URI is set).",
)
@stage_command
def tracking_init(out, experiment, enabled, results_dir):
    """Create the MLflow store and experiment once, before jobs fan out."""
    from zsqpipe.tracking import init_tracking

    info = init_tracking(out, enabled, experiment, results_dir)
    _log(json.dumps(info))


@cli.command("data")
@click.option(
    "--dataset", required=True, help="Registered dataset: fashion_mnist, cifar10, cifar100, imagenet."
)
@click.option(
    "--params", "params_json", default="{}", help="Data config as JSON (data_dir, allow_download, ...)."
)
@click.option("--out", type=PATH, required=True, help="Manifest to write (JSON).")
@tracking_options
@stage_command
def data_cmd(dataset, params_json, out, tracking, rule, wildcards, log_file):
    """Locate and verify DATASET, fix the seeded validation split, write a manifest."""
    from zsqpipe.config import DataConfig, from_dict
    from zsqpipe.stages.data import prepare_data

    params = _json(params_json, "--params")
    cfg = from_dict(DataConfig, params, "data")
    with tracked_run(tracking, rule, wildcards, params, log_file) as tracker:
        m = prepare_data(dataset, cfg, out)
        tracker.log_params({"dataset": dataset, "data": params})
        tracker.log_metrics({k: m[k] for k in ("n_train", "n_val", "n_test")})
        tracker.log_artifact(out)
        _log(f"{dataset}: {m['n_train']} train / {m['n_val']} val / {m['n_test']} test -> {out}")


@cli.command("fp-model")
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--arch", required=True, help="Registered architecture (resnet20, resnet18, mobilenet_v2).")
@click.option("--params", "params_json", default="{}", help="FP recipe as JSON (see config fp_model).")
@click.option("--out-model", type=PATH, required=True)
@click.option("--out-metrics", type=PATH, required=True)
@runtime_options
@resume_options
@tracking_options
@stage_command
def fp_model_cmd(
    manifest, arch, params_json, out_model, out_metrics, device, threads, resume_root, no_resume, tracking,
    rule, wildcards, log_file
):  # fmt: skip
    """Train the full-precision model from scratch, or load a local checkpoint."""
    from zsqpipe.config import FPConfig, from_dict
    from zsqpipe.stages.fp_model import run_fp_model

    params = _json(params_json, "--params")
    cfg = from_dict(FPConfig, params, "fp_model")
    with tracked_run(tracking, rule, wildcards, params, log_file) as tracker:
        run_fp_model(manifest, arch, cfg, out_model, out_metrics, device, threads, tracker, _log,
                     resume_root=_resume_root(resume_root, no_resume, out_model))  # fmt: skip


@cli.command("synthesize")
@click.option("--fp", "fp_ckpt", type=EXISTING, required=True, help="FP checkpoint from `zsqpipe fp-model`.")
@click.option("--synthesizer", required=True, help="Synthesizer name (hast, zeroq, intraq, ...).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="The synthesizer's settings as JSON.")
@click.option("--out", type=PATH, required=True, help="Output folder: shard-*.parquet + manifest.json.")
@runtime_options
@tracking_options
@stage_command
def synthesize_cmd(fp_ckpt, synthesizer, seed, params_json, out, device, threads, tracking, rule, wildcards,
                   log_file):  # fmt: skip
    """Synthesize samples from the FP model alone (no real data) and write verified Parquet shards."""
    from zsqpipe.stages.synthesize import run_synthesize

    params = _json(params_json, "--params")
    cell = {"synthesizer": synthesizer, "cfg": params, "seed": seed}
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_synthesize(fp_ckpt, synthesizer, params, seed, out, device, threads, tracker, _log)


@cli.command("quantize")
@click.option("--fp", "fp_ckpt", type=EXISTING, required=True, help="FP checkpoint from `zsqpipe fp-model`.")
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--method", required=True, help="Method name (real, ptq, ...).")
@click.option("--wbits", type=int, required=True, help="Weight bits.")
@click.option("--abits", type=int, required=True, help="Activation bits.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--quant-params", default="{}", help="QuantConfig fields as JSON (bits come from --wbits/--abits)."
)
@click.option("--method-params", default="{}", help="The method's hyperparameters as JSON.")
@click.option(
    "--samples",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Folder of synthetic samples from `zsqpipe synthesize` (methods that train on them).",
)
@click.option("--out-model", type=PATH, required=True)
@click.option("--out-history", type=PATH, required=True)
@runtime_options
@resume_options
@tracking_options
@stage_command
def quantize_cmd(
    samples,
    fp_ckpt,
    manifest,
    method,
    wbits,
    abits,
    seed,
    quant_params,
    method_params,
    out_model,
    out_history,
    device,
    threads,
    resume_root,
    no_resume,
    tracking,
    rule,
    wildcards,
    log_file,
):
    """Quantize the FP model and calibrate / fine-tune it with METHOD."""
    from zsqpipe.quant import QuantConfig
    from zsqpipe.stages.quantize import run_quantize

    q = _json(quant_params, "--quant-params")
    q.update(weight_bits=wbits, act_bits=abits)
    qcfg = QuantConfig.from_dict(q)
    mcfg = _json(method_params, "--method-params")
    cell = {"quant": q, "method": method, "cfg": mcfg, "seed": seed}
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_quantize(
            fp_ckpt,
            manifest,
            method,
            mcfg,
            qcfg,
            seed,
            out_model,
            out_history,
            device,
            threads,
            tracker,
            _log,
            samples=samples,
            resume_root=_resume_root(resume_root, no_resume, out_model),
        )


@cli.command("evaluate")
@click.option("--model", "model_path", type=EXISTING, required=True, help="Quantized model from `quantize`.")
@click.option("--history", type=EXISTING, required=True, help="history.json from `quantize`.")
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option(
    "--cell",
    "cell_json",
    required=True,
    help='Identity of the result as JSON: {"dataset", "arch", "method", "w_bits", "a_bits", "seed"}.',
)
@click.option("--out", type=PATH, required=True, help="metrics.json to write.")
@runtime_options
@tracking_options
@stage_command
def evaluate_cmd(
    model_path, history, manifest, cell_json, out, device, threads, tracking, rule, wildcards, log_file
):
    """Test a quantized model; write top-1/top-5, last/best-epoch accuracy, size and BitOPs."""
    from zsqpipe.stages.evaluate import run_evaluate

    cell = _json(cell_json, "--cell")
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_evaluate(model_path, history, manifest, out, cell, device, threads, tracker, _log)


@cli.command("export")
@click.option("--model", "model_path", type=EXISTING, required=True, help="Quantized model.pt from `quantize`.")
@click.option("--out", type=PATH, required=True, help="model.onnx to write (QDQ, integer weights).")
@click.option("--out-fp32", type=PATH, required=True, help="model_fp32.onnx: the same weights in float.")
@click.option("--report", type=PATH, required=True, help="export.json: how each layer runs, kernels, sizes.")
@click.option(
    "--mode",
    type=click.Choice(["exact", "qlinear"]),
    default="exact",
    show_default=True,
    help="exact: ConvInteger + float requantization (the fake-quant arithmetic); qlinear: QDQ with an int32 "
    "bias that onnxruntime fuses into QLinearConv (docs/deploy.md).",
)
@click.option(
    "--dataset",
    default=None,
    help="The data set the model reads: its inputs are normalized 8-bit pixels, so the first conv runs as "
    "ConvInteger on the pixels; omitted, the first conv stays float.",
)
@tracking_options
@stage_command
def export_cmd(model_path, out, out_fp32, report, mode, dataset, tracking, rule, wildcards, log_file):
    """Export a quantized model to ONNX (QDQ, opset 21) for onnxruntime's integer kernels."""
    from zsqpipe.stages.deploy import run_export

    with tracked_run(tracking, rule, wildcards, {"mode": mode, "dataset": dataset}, log_file) as tracker:
        run_export(model_path, out, out_fp32, report, mode, dataset, tracker, _log)


@cli.command("deploy-eval")
@click.option("--model", "model_path", type=EXISTING, required=True, help="Quantized model.pt from `quantize`.")
@click.option("--onnx", "onnx_path", type=EXISTING, required=True, help="model.onnx from `zsqpipe export`.")
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--cell", "cell_json", required=True, help="Identity of the result as JSON (as `evaluate`).")
@click.option("--out", type=PATH, required=True, help="deploy.json to write.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch and onnxruntime threads.")
@tracking_options
@stage_command
def deploy_eval_cmd(model_path, onnx_path, manifest, cell_json, out, threads, tracking, rule, wildcards, log_file):
    """Test the integer ONNX model and the fake-quantized model on the whole test set; count disagreements."""
    from zsqpipe.stages.deploy import run_deploy_eval

    cell = _json(cell_json, "--cell")
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_deploy_eval(model_path, onnx_path, manifest, out, cell, threads, tracker, _log)


@cli.command("deploy-latency")
@click.option("--model", "model_path", type=EXISTING, required=True, help="Quantized model.pt from `quantize`.")
@click.option("--onnx", "onnx_path", type=EXISTING, required=True, help="model.onnx from `zsqpipe export`.")
@click.option("--onnx-fp32", "fp32_path", type=EXISTING, required=True, help="model_fp32.onnx from `export`.")
@click.option("--key", "key_json", required=True, help='What is timed, as JSON: {"dataset", "arch", "w_bits", "a_bits"}.')
@click.option("--out", type=PATH, required=True, help="latency.json to write.")
@click.option("--batch-sizes", default="1,256", show_default=True, help="Comma-separated batch sizes.")
@click.option("--thread-counts", default="1,2", show_default=True, help="Comma-separated thread counts.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs (median).")
@tracking_options
@stage_command
def deploy_latency_cmd(model_path, onnx_path, fp32_path, key_json, out, batch_sizes, thread_counts, runs,
                       tracking, rule, wildcards, log_file):  # fmt: skip
    """Median latency of the integer ONNX, FP32 ONNX and PyTorch fake-quantized model."""
    from zsqpipe.stages.deploy import run_deploy_latency

    key = _json(key_json, "--key")
    batches, threads = _int_list(batch_sizes, "--batch-sizes"), _int_list(thread_counts, "--thread-counts")
    with tracked_run(tracking, rule, wildcards, {**key, "runs": runs}, log_file) as tracker:
        run_deploy_latency(model_path, onnx_path, fp32_path, out, key, batches, threads, runs, tracker, _log)


def _int_list(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated positive integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise ConfigError(f"{what}: expected comma-separated positive integers, got {value!r}")
    return out


@cli.command("deploy-table")
@click.option("--deploy", "deploy_paths", multiple=True, type=EXISTING, required=True, help="deploy.json (repeat).")
@click.option("--export", "export_paths", multiple=True, type=EXISTING, required=True,
              help="export.json of the same cells, same order (repeat).")  # fmt: skip
@click.option("--latency", "latency_paths", multiple=True, type=EXISTING, help="latency.json (repeat).")
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--title", default="Integer deployment (onnxruntime, CPU)", show_default=True)
@tracking_options
@stage_command
def deploy_table_cmd(deploy_paths, export_paths, latency_paths, out_csv, out_md, title, tracking, rule, wildcards,
                     log_file):  # fmt: skip
    """Build deploy.csv/.md: fake-quant vs integer top-1, disagreement, kernels, size and latency ratios."""
    import functools as ft

    from zsqpipe.stages.deploy import run_deploy_table

    build = ft.partial(run_deploy_table, list(deploy_paths), list(export_paths), list(latency_paths), out_csv,
                       out_md, title)  # fmt: skip
    _table_run("deploy", deploy_paths, build, (out_csv, out_md), tracking, rule, wildcards, log_file)


@cli.command("aggregate")
@click.argument("metrics", nargs=-1, type=EXISTING, required=True)
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--title", default="zsqpipe results", show_default=True)
@click.option(
    "--paper",
    "paper_json",
    default="{}",
    help='Published top-1 as JSON {dataset: {arch: {method: {"w4a4": value}}}}: a "paper" column.',
)
@tracking_options
@stage_command
def aggregate_cmd(metrics, out_csv, out_md, title, paper_json, tracking, rule, wildcards, log_file):
    """Build a results table (CSV + Markdown) from METRICS files (mean ± std over seeds)."""
    from zsqpipe.stages.aggregate import run_aggregate

    paper = _json(paper_json, "--paper")
    build = functools.partial(run_aggregate, list(metrics), out_csv, out_md, title, paper)
    _table_run("metrics", metrics, build, (out_csv, out_md), tracking, rule, wildcards, log_file)


def _seed_list(seed: tuple[int, ...], seeds: str | None) -> list[int]:
    out = list(seed)
    for tok in (seeds or "").split(","):
        if tok.strip():
            try:
                out.append(int(tok))
            except ValueError:
                raise ConfigError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    return out or [0]


@cli.command("search")
@click.option(
    "--space", default="nb201", show_default=True, help="Search space (nb201 = NAS-Bench-201 cells)."
)
@click.option("--dataset", required=True, help="Benchmark dataset: cifar10, cifar100 or imagenet16.")
@click.option("--strategy", required=True, help="Strategy: random, rea, reinforce, ase or ase_plus.")
@click.option("--seed", type=int, multiple=True, help="A search seed (repeatable; default: 0 alone).")
@click.option(
    "--seeds", default=None, help="Search seeds as a comma-separated list, e.g. 0,1,2 (with --seed: both)."
)
@click.option(
    "--budget", type=int, default=200, show_default=True, help="Benchmark queries (initial ones included)."
)
@click.option(
    "--params", "params_json", default="{}", help="The strategy's settings as JSON (config nas.params)."
)
@click.option(
    "--init-from",
    type=EXISTING,
    default=None,
    help="ase_plus: a previous search result; its record of the same seed (final nodes, or best cell) seeds "
    "the initial nodes.",
)
@click.option(
    "--benchmark",
    "benchmark_path",
    type=EXISTING,
    default=None,
    help="Ground-truth table (CSV, may be .gz) instead of the packaged NAS-Bench-201 one.",
)
@click.option("--out", type=PATH, required=True, help="Result JSON to write (one record per seed).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (the rule's `threads`).")
@tracking_options
@stage_command
def search_cmd(space, dataset, strategy, seed, seeds, budget, params_json, init_from, benchmark_path, out,
               threads, tracking, rule, wildcards, log_file):  # fmt: skip
    """Search the tabular benchmark with STRATEGY on validation accuracy, once per seed, in one process;
    report each found cell's test accuracy."""
    from zsqpipe.stages.search import run_search

    params = _json(params_json, "--params")
    seed_list = _seed_list(seed, seeds)
    cell = {"space": space, "dataset": dataset, "strategy": strategy, "seeds": seed_list, "budget": budget,
            "cfg": params}  # fmt: skip
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_search(dataset, strategy, seed_list, budget, params, out, space, init_from, benchmark_path,
                   threads, tracker, _log)  # fmt: skip


@cli.command("nas-table")
@click.argument("results", nargs=-1, type=EXISTING, required=True)
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--title", default="NAS-Bench-201 tabular search", show_default=True)
@click.option(
    "--paper",
    "paper_json",
    default="{}",
    help='Published numbers as JSON {strategy: {dataset: {"mean": m, "std": s}}}: a "paper" column.',
)
@click.option(
    "--benchmark",
    "benchmark_path",
    type=EXISTING,
    default=None,
    help="Ground-truth table for the optimum columns (default: the packaged NAS-Bench-201 one).",
)
@tracking_options
@stage_command
def nas_table_cmd(results, out_csv, out_md, title, paper_json, benchmark_path, tracking, rule, wildcards,
                  log_file):  # fmt: skip
    """Build the NAS table (CSV + Markdown) from `zsqpipe search` RESULTS (mean ± std over seeds)."""
    from zsqpipe.stages.nas_table import run_nas_table

    paper = _json(paper_json, "--paper")
    build = functools.partial(run_nas_table, list(results), out_csv, out_md, title, paper, benchmark_path)
    _table_run("results", results, build, (out_csv, out_md), tracking, rule, wildcards, log_file)


@cli.command("groundtruth")
@click.option(
    "--dataset", required=True, help="fashion_mnist (trained stand-alone), cifar10 or cifar100 (NB201 table)."
)
@click.option(
    "--chunk", type=int, default=0, show_default=True, help="Chunk of the sample (chunk_size cells each)."
)
@click.option(
    "--data",
    "manifest",
    type=EXISTING,
    default=None,
    help="Manifest from `zsqpipe data` (datasets without NB201 ground truth: the cells are trained on it).",
)
@click.option(
    "--params",
    "params_json",
    default="{}",
    help="Sample and training recipe as JSON (config supernet.groundtruth).",
)
@click.option(
    "--benchmark",
    "benchmark_path",
    type=EXISTING,
    default=None,
    help="Ground-truth table (CSV, may be .gz) instead of the packaged NAS-Bench-201 one.",
)
@click.option("--out", type=PATH, required=True, help="Ground-truth JSON of the chunk.")
@runtime_options
@tracking_options
@stage_command
def groundtruth_cmd(dataset, chunk, manifest, params_json, benchmark_path, out, device, threads, tracking, rule,
                    wildcards, log_file):  # fmt: skip
    """Ground-truth validation/test accuracy of a chunk of a fixed sample of NB201 Kendall-subset cells."""
    from zsqpipe.stages.groundtruth import GroundTruthConfig, run_groundtruth

    params = _json(params_json, "--params")
    cfg = GroundTruthConfig.from_dict(params)
    cell = {"dataset": dataset, "chunk": chunk, "cfg": params}
    with tracked_run(tracking, rule, wildcards, cell, log_file) as tracker:
        run_groundtruth(dataset, chunk, cfg, out, manifest, device, threads, tracker, _log, benchmark_path)


@cli.command("supernet-train")
@click.argument("groundtruth", nargs=-1, type=EXISTING, required=True)
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--method", required=True, help="spos or spos_calr_ms (SPOS + CaLR + momentum separation).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--params", "params_json", default="{}", help="Supernet recipe as JSON (config supernet.train)."
)
@click.option("--out-model", type=PATH, required=True, help="Supernet checkpoint to write.")
@click.option("--out-history", type=PATH, required=True, help="Per-epoch training history (JSON).")
@click.option("--out-metrics", type=PATH, required=True, help="Ranking metrics (JSON), written last.")
@runtime_options
@resume_options
@tracking_options
@stage_command
def supernet_train_cmd(groundtruth, manifest, method, seed, params_json, out_model, out_history, out_metrics,
                       device, threads, resume_root, no_resume, tracking, rule, wildcards, log_file):  # fmt: skip
    """Train the NB201 supernet, then rank the GROUNDTRUTH cells (files from `zsqpipe groundtruth`) with it:
    Kendall-tau and the top-1 of the best-ranked cell."""
    from zsqpipe.nas.calr import SupernetConfig
    from zsqpipe.stages.supernet_train import run_supernet_train

    params = _json(params_json, "--params")
    for key in ("method", "seed"):
        if key in params:
            raise ConfigError(f"--params: {key!r} is given by --{key}")
    cfg = SupernetConfig.from_dict({**params, "method": method, "seed": seed}, "supernet.train")
    with tracked_run(tracking, rule, wildcards, cfg.to_dict(), log_file) as tracker:
        run_supernet_train(manifest, list(groundtruth), cfg, out_model, out_history, out_metrics, device, threads,
                           tracker, _log, _resume_root(resume_root, no_resume, out_model))  # fmt: skip


@cli.command("supernet-search")
@click.argument("supernet", type=EXISTING)
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--strategy", required=True, help="random, rea, reinforce or ase.")
@click.option(
    "--params", "params_json", default="{}", help="Search settings as JSON (config supernet.search)."
)
@click.option(
    "--strategy-params", "strategy_json", default="{}", help="The strategy's settings (nas.params.<name>)."
)
@click.option("--groundtruth-params", "gt_json", default=None,
              help="Stand-alone training recipe as JSON (config supernet.groundtruth with C, N), for the found cells.")  # fmt: skip
@click.option("--out", type=PATH, required=True, help="Search result (JSON).")
@runtime_options
@tracking_options
@stage_command
def supernet_search_cmd(supernet, manifest, strategy, params_json, strategy_json, gt_json, out, device, threads,
                        tracking, rule, wildcards, log_file):  # fmt: skip
    """Search NB201 cells with a trained SUPERNET (from `zsqpipe supernet-train`) as the evaluator; report the
    found cells' supernet and stand-alone test accuracy."""
    from zsqpipe.stages.groundtruth import GroundTruthConfig
    from zsqpipe.stages.supernet_search import SupernetSearchConfig, run_supernet_search

    cfg = SupernetSearchConfig.from_dict(_json(params_json, "--params"))
    gt = GroundTruthConfig.from_dict(_json(gt_json, "--groundtruth-params")) if gt_json else None
    with tracked_run(tracking, rule, wildcards, {"search": cfg.to_dict(), "strategy": strategy}, log_file) as tracker:
        run_supernet_search(supernet, manifest, strategy, cfg, out, _json(strategy_json, "--strategy-params"), gt,
                            device, threads, tracker, _log)  # fmt: skip


@cli.command("supernet-search-table")
@click.argument("searches", nargs=-1, type=EXISTING, required=True)
@click.option("--groundtruth", "gt_files", multiple=True, type=EXISTING,
              help="Ground-truth files (`zsqpipe groundtruth`) for the random-cell reference rows; repeatable.")  # fmt: skip
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--title", default="NAS with a trained supernet as the evaluator", show_default=True)
@tracking_options
@stage_command
def supernet_search_table_cmd(
    searches, gt_files, out_csv, out_md, title, tracking, rule, wildcards, log_file
):
    """Table of `zsqpipe supernet-search` SEARCHES: the found cells' stand-alone test accuracy per supernet
    method and strategy (mean ± std), next to random groundtruth cells."""
    from zsqpipe.stages.supernet_search import run_supernet_search_table

    build = functools.partial(
        run_supernet_search_table, list(searches), out_csv, out_md, list(gt_files) or None, title
    )
    _table_run("searches", searches, build, (out_csv, out_md), tracking, rule, wildcards, log_file)


@cli.command("supernet-table")
@click.argument("metrics", nargs=-1, type=EXISTING, required=True)
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--title", default="NB201 supernet ranking", show_default=True)
@click.option(
    "--paper",
    "paper_json",
    default="{}",
    help='Published numbers as JSON {method: {truth: {"tau": {"mean": m, "std": s}, "top1": {...}}}}.',
)
@tracking_options
@stage_command
def supernet_table_cmd(metrics, out_csv, out_md, title, paper_json, tracking, rule, wildcards, log_file):
    """Build the supernet table (CSV + Markdown) from `zsqpipe supernet-train` METRICS (mean ± std over seeds)."""
    from zsqpipe.stages.supernet_table import run_supernet_table

    paper = _json(paper_json, "--paper")
    build = functools.partial(run_supernet_table, list(metrics), out_csv, out_md, title, paper)
    _table_run("metrics", metrics, build, (out_csv, out_md), tracking, rule, wildcards, log_file)


@cli.command("plot")
@click.argument("inputs", nargs=-1, type=EXISTING, required=True)
@click.option(
    "--kind",
    type=click.Choice(["bits", "ablation", "steps", "nas_curves", "deploy"]),
    required=True,
    help="bits: accuracy vs bit-width (one results table); ablation: bars per method/variant (one results "
    "table); steps: accuracy vs student steps (one results table + --methods); nas_curves: best validation "
    "accuracy vs queries (`zsqpipe search` result files); deploy: fake-quant vs integer top-1 (deploy.csv).",
)
@click.option("--out", type=PATH, required=True, help="PNG to write.")
@click.option("--title", default=None, help="Figure title.")
@click.option("--order", default="", help="Comma-separated method/strategy order (e.g. the config's).")
@click.option("--style", "style_json", default="{}", help='Plot style as JSON, e.g. {"dpi": 120}.')
@click.option(
    "--benchmark",
    "benchmark_path",
    type=EXISTING,
    default=None,
    help="nas_curves: ground-truth table for the reference line (default: the packaged NAS-Bench-201 one).",
)
@click.option(
    "--methods",
    "methods_json",
    default="{}",
    help='steps: JSON {method or variant: {"method": base, "cfg": {...}}}; the student steps come from each cfg.',
)
@stage_command
def plot_cmd(inputs, kind, out, title, order, style_json, benchmark_path, methods_json):
    """Draw one report figure from INPUTS (a results table CSV, or search result JSON files) as a PNG."""
    from zsqpipe.plots import run_plot

    optimum = None
    if kind == "nas_curves":
        from zsqpipe.io import read_json
        from zsqpipe.nas.benchmark import benchmark_optimum

        datasets = {read_json(p).get("dataset") for p in inputs} - {None}
        optimum = {d: benchmark_optimum(d, benchmark_path)["best_valid_acc"] for d in sorted(datasets)}
    order_list = [o for o in order.split(",") if o]
    methods = _json(methods_json, "--methods")
    path = run_plot(kind, list(inputs), out, title, order_list, optimum, _json(style_json, "--style"), methods)
    _log(f"{kind} plot -> {path}")


# ---- OQAT (docs/methods/oqat.md): quantized supernet, bit inheritance, BitOPs-constrained search ----


@cli.command("oqat-train")
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--bits", type=int, required=True, help="W = A bits of the supernet.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="Training recipe as JSON (config oqat.train).")
@click.option(
    "--inherit-from",
    type=EXISTING,
    default=None,
    help="Higher-bit `oqat-train` checkpoint to initialise from (bit inheritance), then fine-tune.",
)
@click.option("--out-model", type=PATH, required=True, help="Supernet checkpoint to write.")
@click.option("--out-history", type=PATH, required=True, help="Per-epoch training history (JSON).")
@click.option("--out-metrics", type=PATH, required=True, help="Metrics (JSON), written last.")
@runtime_options
@resume_options
@tracking_options
@stage_command
def oqat_train_cmd(manifest, bits, seed, params_json, inherit_from, out_model, out_history, out_metrics, device,
                   threads, resume_root, no_resume, tracking, rule, wildcards, log_file):  # fmt: skip
    """Train an LSQ-quantized supernet (NB201 or OFA/MobileNetV3 space) with shared step sizes (OQAT), from
    scratch or by bit inheritance from a higher-bit supernet."""
    from zsqpipe.nas.oqat import OQATTrainConfig
    from zsqpipe.stages.oqat_train import run_oqat_train

    params = _json(params_json, "--params")
    for key in ("bits", "seed"):
        if key in params:
            raise ConfigError(f"--params: '{key}' is set by --{key}, not in the params")
    cfg = OQATTrainConfig.from_dict({**params, "bits": bits, "seed": seed}, "oqat.train")
    with tracked_run(tracking, rule, wildcards, cfg.to_dict(), log_file) as tracker:
        run_oqat_train(manifest, cfg, out_model, out_history, out_metrics, inherit_from, device, threads, tracker,
                       _log, _resume_root(resume_root, no_resume, out_model))  # fmt: skip


@cli.command("oqat-search")
@click.argument("supernet", type=EXISTING)
@click.option("--data", "manifest", type=EXISTING, required=True, help="Manifest from `zsqpipe data`.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="Search settings as JSON (config oqat.search).")
@click.option("--out", type=PATH, required=True, help="Search result (JSON).")
@runtime_options
@tracking_options
@stage_command
def oqat_search_cmd(supernet, manifest, seed, params_json, out, device, threads, tracking, rule, wildcards,
                    log_file):  # fmt: skip
    """BitOPs-constrained search on an `oqat-train` SUPERNET (validation top-1 after BN recalibration); the
    found cells' test top-1 is measured after the search."""
    from zsqpipe.nas.oqat import OQATSearchConfig
    from zsqpipe.stages.oqat_search import run_oqat_search

    params = _json(params_json, "--params")
    if "seed" in params:
        raise ConfigError("--params: 'seed' is set by --seed, not in the params")
    cfg = OQATSearchConfig.from_dict({**params, "seed": seed}, "oqat.search")
    with tracked_run(tracking, rule, wildcards, cfg.to_dict(), log_file) as tracker:
        run_oqat_search(supernet, manifest, cfg, out, device, threads, tracker, _log)


@cli.command("oqat-table")
@click.argument("searches", nargs=-1, type=EXISTING, required=True)
@click.option("--out-csv", type=PATH, required=True)
@click.option("--out-md", type=PATH, required=True)
@click.option("--out-pareto", type=PATH, default=None, help="CSV of every search's validation-Pareto front.")
@click.option("--out-plot", type=PATH, default=None, help="PNG: test top-1 vs BitOPs per bit-width.")
@click.option("--title", default="OQAT on NB201", show_default=True)
@tracking_options
@stage_command
def oqat_table_cmd(
    searches, out_csv, out_md, out_pareto, out_plot, title, tracking, rule, wildcards, log_file
):
    """Build the OQAT table (CSV + Markdown), Pareto CSV and plot from `zsqpipe oqat-search` SEARCHES."""
    from zsqpipe.stages.oqat_table import run_oqat_table

    build = functools.partial(run_oqat_table, list(searches), out_csv, out_md, out_pareto, out_plot, title)
    outputs = (out_csv, out_md, out_pareto, out_plot)
    _table_run("searches", searches, build, outputs, tracking, rule, wildcards, log_file)


def _terminate(signum, _frame):
    # SIGTERM (Snakemake, Slurm) unwinds like an exception: temp files are removed, the MLflow run is FAILED
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="zsqpipe")


if __name__ == "__main__":
    main()
