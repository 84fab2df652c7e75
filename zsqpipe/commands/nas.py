"""Commands of NAS: tabular search (search -> nas-table), the NB201 supernet (groundtruth + supernet-train ->
supernet-table, supernet-search -> supernet-search-table) and OQAT (oqat-train -> oqat-search -> oqat-table)."""

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
)
from zsqpipe.errors import ConfigError

BENCHMARK = (("--benchmark", "benchmark_path"), {"type": EXISTING, "default": None,
             "help": "Ground-truth table (CSV, may be .gz) instead of the packaged NAS-Bench-201 one."})  # fmt: skip
TRAIN_OUTPUTS = [
    (("--out-model",), {"type": PATH, "required": True, "help": "Supernet checkpoint to write."}),
    (("--out-history",), {"type": PATH, "required": True, "help": "Per-epoch training history (JSON)."}),
]


def out_metrics(what: str = "Metrics") -> tuple:
    return (("--out-metrics",), {"type": PATH, "required": True, "help": f"{what} (JSON), written last."})


def _seed_list(seed: tuple[int, ...], seeds: str | None) -> list[int]:
    out = list(seed)
    for tok in (seeds or "").split(","):
        if tok.strip():
            try:
                out.append(int(tok))
            except ValueError:
                raise ConfigError(f"--seeds: expected comma-separated integers, got {seeds!r}") from None
    return out or [0]


def _config(cls, params: dict, section: str, **given):
    """``cls.from_dict`` of the ``--params`` JSON plus the values given by their own options (``given``)."""
    for key in given:
        if key in params:
            raise ConfigError(f"--params: '{key}' is set by --{key}, not in the params")
    return cls.from_dict({**params, **given}, section)


@job_command("search", device=False)
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
@click.option("--init-from", type=EXISTING, default=None,
              help="ase_plus: a previous search result; its record of the same seed (final nodes, or best cell) "
              "seeds the initial nodes.")  # fmt: skip
@options(BENCHMARK)
@click.option("--out", type=PATH, required=True, help="Result JSON to write (one record per seed).")
def search_cmd(
    open_job, space, dataset, strategy, seed, seeds, budget, params_json, init_from, benchmark_path, out
):
    """Search the tabular benchmark with STRATEGY on validation accuracy, once per seed, in one process;
    report each found cell's test accuracy."""
    from zsqpipe.stages.search import run_search

    params, seed_list = parse_json(params_json, "--params"), _seed_list(seed, seeds)
    cell = {"space": space, "dataset": dataset, "strategy": strategy, "seeds": seed_list, "budget": budget,
            "cfg": params}  # fmt: skip
    with open_job(cell) as job:
        run_search(dataset, strategy, seed_list, budget, params, out, space, init_from, benchmark_path, job)


@table_command("nas-table", "results")
@click.argument("results", nargs=-1, type=EXISTING, required=True)
@options(*TABLE_OUTPUTS)
@click.option("--title", default="NAS-Bench-201 tabular search", show_default=True)
@click.option("--paper", "paper_json", default="{}",
              help='Published numbers as JSON {strategy: {dataset: {"mean": m, "std": s}}}: a "paper" column.')  # fmt: skip
@click.option("--benchmark", "benchmark_path", type=EXISTING, default=None,
              help="Ground-truth table for the optimum columns (default: the packaged NAS-Bench-201 one).")  # fmt: skip
def nas_table_cmd(results, out_csv, out_md, title, paper_json, benchmark_path):
    """Build the NAS table (CSV + Markdown) from `zsqpipe search` RESULTS (mean ± std over seeds)."""
    from zsqpipe.stages.nas_table import run_nas_table

    paper = parse_json(paper_json, "--paper")
    build = functools.partial(run_nas_table, list(results), out_csv, out_md, title, paper, benchmark_path)
    return results, build, (out_csv, out_md)


@job_command("groundtruth")
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
@click.option("--params", "params_json", default="{}",
              help="Sample and training recipe as JSON (config supernet.groundtruth).")  # fmt: skip
@options(BENCHMARK)
@click.option("--out", type=PATH, required=True, help="Ground-truth JSON of the chunk.")
def groundtruth_cmd(open_job, dataset, chunk, manifest, params_json, benchmark_path, out):
    """Ground-truth validation/test accuracy of a chunk of a fixed sample of NB201 Kendall-subset cells."""
    from zsqpipe.stages.groundtruth import GroundTruthConfig, run_groundtruth

    params = parse_json(params_json, "--params")
    cfg = GroundTruthConfig.from_dict(params)
    with open_job({"dataset": dataset, "chunk": chunk, "cfg": params}) as job:
        run_groundtruth(dataset, chunk, cfg, out, manifest, benchmark_path, job)


@job_command("supernet-train", resume="out_model")
@click.argument("groundtruth", nargs=-1, type=EXISTING, required=True)
@options(MANIFEST)
@click.option("--method", required=True, help="spos or spos_calr_ms (SPOS + CaLR + momentum separation).")
@click.option("--label", default=None, help="The run's name in tables (a supernet.variants name; default: --method).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--params", "params_json", default="{}", help="Supernet recipe as JSON (config supernet.train)."
)
@options(*TRAIN_OUTPUTS, out_metrics("Ranking metrics"))
def supernet_train_cmd(open_job, groundtruth, manifest, method, label, seed, params_json, out_model, out_history,
                       out_metrics):  # fmt: skip
    """Train the NB201 supernet, then rank the GROUNDTRUTH cells (files from `zsqpipe groundtruth`) with it:
    Kendall-tau and the top-1 of the best-ranked cell."""
    from zsqpipe.nas.calr import SupernetConfig
    from zsqpipe.stages.supernet_train import run_supernet_train

    cfg = _config(
        SupernetConfig, parse_json(params_json, "--params"), "supernet.train", method=method, seed=seed
    )
    with open_job({**cfg.to_dict(), "label": label or method}) as job:
        run_supernet_train(manifest, list(groundtruth), cfg, out_model, out_history, out_metrics, job, label)


@job_command("supernet-search")
@click.argument("supernet", type=EXISTING)
@options(MANIFEST)
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
def supernet_search_cmd(open_job, supernet, manifest, strategy, params_json, strategy_json, gt_json, out):
    """Search NB201 cells with a trained SUPERNET (from `zsqpipe supernet-train`) as the evaluator; report the
    found cells' supernet and stand-alone test accuracy."""
    from zsqpipe.stages.groundtruth import GroundTruthConfig
    from zsqpipe.stages.supernet_search import SupernetSearchConfig, run_supernet_search

    cfg = SupernetSearchConfig.from_dict(parse_json(params_json, "--params"))
    gt = GroundTruthConfig.from_dict(parse_json(gt_json, "--groundtruth-params")) if gt_json else None
    with open_job({"search": cfg.to_dict(), "strategy": strategy}) as job:
        run_supernet_search(supernet, manifest, strategy, cfg, out, parse_json(strategy_json, "--strategy-params"),
                            gt, job)  # fmt: skip


@table_command("supernet-search-table", "searches")
@click.argument("searches", nargs=-1, type=EXISTING, required=True)
@click.option("--groundtruth", "gt_files", multiple=True, type=EXISTING,
              help="Ground-truth files (`zsqpipe groundtruth`) for the random-cell reference rows; repeatable.")  # fmt: skip
@options(*TABLE_OUTPUTS)
@click.option("--title", default="NAS with a trained supernet as the evaluator", show_default=True)
def supernet_search_table_cmd(searches, gt_files, out_csv, out_md, title):
    """Table of `zsqpipe supernet-search` SEARCHES: the found cells' stand-alone test accuracy per supernet
    method and strategy (mean ± std), next to random groundtruth cells."""
    from zsqpipe.stages.supernet_search import run_supernet_search_table

    build = functools.partial(run_supernet_search_table, list(searches), out_csv, out_md, list(gt_files) or None,
                              title)  # fmt: skip
    return searches, build, (out_csv, out_md)


@table_command("supernet-table", "metrics")
@click.argument("metrics", nargs=-1, type=EXISTING, required=True)
@options(*TABLE_OUTPUTS)
@click.option("--title", default="NB201 supernet ranking", show_default=True)
@click.option("--paper", "paper_json", default="{}",
              help='Published numbers as JSON {method: {truth: {"tau": {"mean": m, "std": s}, "top1": {...}}}}.')  # fmt: skip
def supernet_table_cmd(metrics, out_csv, out_md, title, paper_json):
    """Build the supernet table (CSV + Markdown) from `zsqpipe supernet-train` METRICS (mean ± std over seeds)."""
    from zsqpipe.stages.supernet_table import run_supernet_table

    paper = parse_json(paper_json, "--paper")
    return (
        metrics,
        functools.partial(run_supernet_table, list(metrics), out_csv, out_md, title, paper),
        (out_csv, out_md),
    )


# ---- OQAT (docs/methods/oqat.md): quantized supernet, bit inheritance, BitOPs-constrained search ----


@job_command("oqat-train", resume="out_model")
@options(MANIFEST)
@click.option("--bits", type=int, required=True, help="W = A bits of the supernet.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="Training recipe as JSON (config oqat.train).")
@click.option("--inherit-from", type=EXISTING, default=None,
              help="Higher-bit `oqat-train` checkpoint to initialise from (bit inheritance), then fine-tune.")  # fmt: skip
@options(*TRAIN_OUTPUTS, out_metrics())
def oqat_train_cmd(
    open_job, manifest, bits, seed, params_json, inherit_from, out_model, out_history, out_metrics
):
    """Train an LSQ-quantized supernet (NB201 or OFA/MobileNetV3 space) with shared step sizes (OQAT), from
    scratch or by bit inheritance from a higher-bit supernet."""
    from zsqpipe.nas.oqat import OQATTrainConfig
    from zsqpipe.stages.oqat_train import run_oqat_train

    cfg = _config(OQATTrainConfig, parse_json(params_json, "--params"), "oqat.train", bits=bits, seed=seed)
    with open_job(cfg.to_dict()) as job:
        run_oqat_train(manifest, cfg, out_model, out_history, out_metrics, inherit_from, job)


@job_command("oqat-search")
@click.argument("supernet", type=EXISTING)
@options(MANIFEST)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--params", "params_json", default="{}", help="Search settings as JSON (config oqat.search).")
@click.option("--out", type=PATH, required=True, help="Search result (JSON).")
def oqat_search_cmd(open_job, supernet, manifest, seed, params_json, out):
    """BitOPs-constrained search on an `oqat-train` SUPERNET (validation top-1 after BN recalibration); the
    found cells' test top-1 is measured after the search."""
    from zsqpipe.nas.oqat import OQATSearchConfig
    from zsqpipe.stages.oqat_search import run_oqat_search

    cfg = _config(OQATSearchConfig, parse_json(params_json, "--params"), "oqat.search", seed=seed)
    with open_job(cfg.to_dict()) as job:
        run_oqat_search(supernet, manifest, cfg, out, job)


@table_command("oqat-table", "searches")
@click.argument("searches", nargs=-1, type=EXISTING, required=True)
@options(*TABLE_OUTPUTS)
@click.option("--out-pareto", type=PATH, default=None, help="CSV of every search's validation-Pareto front.")
@click.option("--out-plot", type=PATH, default=None, help="PNG: test top-1 vs BitOPs per bit-width.")
@click.option("--title", default="OQAT on NB201", show_default=True)
def oqat_table_cmd(searches, out_csv, out_md, out_pareto, out_plot, title):
    """Build the OQAT table (CSV + Markdown), Pareto CSV and plot from `zsqpipe oqat-search` SEARCHES."""
    from zsqpipe.stages.oqat_table import run_oqat_table

    build = functools.partial(run_oqat_table, list(searches), out_csv, out_md, out_pareto, out_plot, title)
    return searches, build, (out_csv, out_md, out_pareto, out_plot)
