"""``zsqpipe``: the command-line entry point; one thin command per pipeline stage.

Each command parses its options, calls the stage's function in ``zsqpipe.stages`` inside one tracked job
(``zsqpipe.commands``: the job layer) and maps a :class:`~zsqpipe.errors.ZsqError` to a one-line message and
exit status 1. Snakemake rules call these commands with the rule's config slice as JSON (``--params``), so
config changes are visible to Snakemake. The commands live by family in ``zsqpipe/commands/`` (zsq, deploy,
nas); this module holds the group, the untracked commands and the entry point.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from zsqpipe import __version__
from zsqpipe.commands import COMMANDS, EXISTING, PATH, command, echo, parse_json
from zsqpipe.commands import deploy as _deploy  # noqa: F401  (registers its commands)
from zsqpipe.commands import nas as _nas  # noqa: F401
from zsqpipe.commands import zsq as _zsq  # noqa: F401


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsqpipe")
def cli():
    """zsqpipe: zero-shot quantization and quantization-aware NAS, one command per pipeline stage.

    Normally run through Snakemake (`snakemake --cores 2 results/tables/hast.csv`); every command can also be
    run by hand. Stages: data -> fp-model -> quantize -> evaluate -> aggregate; NAS: search -> nas-table,
    groundtruth + supernet-train -> supernet-table.
    """


@command("tracking-init")
@click.option("--out", type=PATH, required=True, help="Where to write tracking.json.")
@click.option("--experiment", default="zsqpipe", show_default=True, help="MLflow experiment name.")
@click.option("--enabled/--disabled", default=True, show_default=True, help="Turn MLflow tracking on or off.")
@click.option("--results-dir", type=PATH, default=Path("results"), show_default=True,
              help="Default SQLite store lives in RESULTS_DIR/mlflow (ignored if MLFLOW_TRACKING_URI is set).")  # fmt: skip
def tracking_init(out, experiment, enabled, results_dir):
    """Create the MLflow store and experiment once, before jobs fan out."""
    from zsqpipe.tracking import init_tracking

    echo(json.dumps(init_tracking(out, enabled, experiment, results_dir)))


@command("plot")
@click.argument("inputs", nargs=-1, type=EXISTING, required=True)
@click.option("--kind", type=click.Choice(["bits", "ablation", "steps", "nas_curves", "deploy"]), required=True,
              help="bits: accuracy vs bit-width (one results table); ablation: bars per method/variant (one "
              "results table); steps: accuracy vs student steps (one results table + --methods); nas_curves: best "
              "validation accuracy vs queries (`zsqpipe search` result files); deploy: fake-quant vs integer "
              "top-1 (deploy.csv).")  # fmt: skip
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
@click.option("--methods", "methods_json", default="{}",
              help='steps: JSON {method or variant: {"method": base, "cfg": {...}}}; the student steps come from '
              "each cfg.")  # fmt: skip
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
    methods = parse_json(methods_json, "--methods")
    path = run_plot(
        kind, list(inputs), out, title, order_list, optimum, parse_json(style_json, "--style"), methods
    )
    echo(f"{kind} plot -> {path}")


for _cmd in COMMANDS:
    cli.add_command(_cmd)


def _terminate(signum, _frame):
    # SIGTERM (Snakemake, Slurm) unwinds like an exception: temp files are removed, the MLflow run is FAILED
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="zsqpipe")


if __name__ == "__main__":
    main()
