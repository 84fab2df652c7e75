"""Stage ``nas-table``: the NAS search table from ``search`` result files (never from MLflow; one file per
space x dataset x strategy, one record per seed).

One row per space x dataset x strategy: mean ± sample std over seeds of the found cell's ground-truth test
accuracy, mean validation accuracy, seeds, queries, the published number (``paper``) and the benchmark's own
reference points computed from the ground-truth table: the best test accuracy of any cell (the optimum) and
the test accuracy of the best-validation cell (what a perfect search on validation accuracy finds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_table
from zsqpipe.nas.benchmark import DATASETS, benchmark_optimum
from zsqpipe.nas.strategies import STRATEGY_NAMES

KEYS = ["space", "dataset", "strategy"]
REQUIRED = KEYS + ["seed", "arch", "valid_acc", "test_acc", "queries", "wall_time_s"]

NOTE = (
    "test = NAS-Bench-201 200-epoch test accuracy (%) of the cell each search returned (selected by validation "
    "accuracy only), mean ± sample std over seeds; valid = its validation accuracy (the search signal); "
    "queries = benchmark queries per search (initial nodes/population included). paper = published mean ± std "
    "(ASE-NAS/DSM-NAS README, 20 trials; their search signal is probably the 12-epoch validation accuracy, "
    "which only the name of the official benchmark file, NAS-Bench-201-iepoch12.json, suggests; ours is the 200-epoch "
    "one: see docs/methods/nas_search.md). optimum = best test accuracy of any cell; best-valid cell = test accuracy "
    "of the cell with the best validation accuracy."
)


def load_results(paths: list[Path]) -> pd.DataFrame:
    """One row per search: every record (seed) of every ``search`` result file."""
    rows = []
    for p in paths:
        content = read_json(p)
        records = content.get("records") if isinstance(content, dict) else None
        if not isinstance(records, list) or not records:
            raise IntegrityError(f"{p}: search result file without 'records'")
        for r in records:
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                raise IntegrityError(f"{p}: search result of seed {r.get('seed')} lacks {missing}")
            rows.append({k: r[k] for k in REQUIRED})
    if not rows:
        raise IntegrityError("nas-table: no search result files given")
    df = pd.DataFrame(rows)
    dup = df.duplicated(KEYS + ["seed"])
    if dup.any():
        raise IntegrityError(f"nas-table: duplicate result for {df[dup].iloc[0][KEYS + ['seed']].tolist()}")
    return df


def paper_value(paper: dict | None, strategy: str, dataset: str) -> tuple[float, float]:
    """Published (mean, std) from ``{strategy: {dataset: {mean, std}}}``; NaN where absent."""
    try:
        entry = paper[strategy][dataset]
        return float(entry["mean"]), float(entry.get("std", np.nan))
    except (KeyError, TypeError):
        return np.nan, np.nan


def _order(values, known) -> list:
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), v))


def summarize(
    df: pd.DataFrame, paper: dict | None = None, benchmark_path: Path | None = None
) -> pd.DataFrame:
    out = []
    optima = {}
    for space in sorted(df["space"].unique()):
        for dataset in _order(df["dataset"].unique(), list(DATASETS)):
            for strategy in _order(df["strategy"].unique(), list(STRATEGY_NAMES)):
                g = df[(df["space"] == space) & (df["dataset"] == dataset) & (df["strategy"] == strategy)]
                if g.empty:
                    continue
                if dataset not in optima:
                    optima[dataset] = benchmark_optimum(dataset, benchmark_path)
                n = len(g)
                pm, ps = paper_value(paper, strategy, dataset)
                out.append(
                    {
                        "space": space,
                        "dataset": dataset,
                        "strategy": strategy,
                        "n_seeds": n,
                        "seeds": " ".join(str(s) for s in sorted(g["seed"])),
                        "queries": float(g["queries"].mean()),
                        "test_acc_mean": float(g["test_acc"].mean()),
                        "test_acc_std": float(g["test_acc"].std(ddof=1)) if n > 1 else np.nan,
                        "valid_acc_mean": float(g["valid_acc"].mean()),
                        "valid_acc_std": float(g["valid_acc"].std(ddof=1)) if n > 1 else np.nan,
                        "n_distinct_archs": int(g["arch"].nunique()),
                        "wall_time_s_mean": float(g["wall_time_s"].mean()),
                        "paper": mean_pm_std(pm, ps),
                        "paper_mean": pm,
                        "paper_std": ps,
                        "optimum_test": optima[dataset]["best_test_acc"],
                        "best_valid_cell_test": optima[dataset]["best_valid_test_acc"],
                    }
                )
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = ["dataset", "strategy", "seeds", "queries", "test", "valid", "paper", "optimum", "best-valid cell",
            "search s"]  # fmt: skip
    rows = [
        [
            r["dataset"],
            r["strategy"],
            str(r["n_seeds"]),
            f"{r['queries']:.0f}",
            mean_pm_std(r["test_acc_mean"], r["test_acc_std"]),
            mean_pm_std(r["valid_acc_mean"], r["valid_acc_std"]),
            r["paper"],
            f"{r['optimum_test']:.2f}",
            f"{r['best_valid_cell_test']:.2f}",
            f"{r['wall_time_s_mean']:.1f}",
        ]
        for _, r in table.iterrows()
    ]
    return "\n".join(markdown_table(title, [NOTE], cols, rows)) + "\n"


def run_nas_table(
    result_paths: list[Path],
    out_csv: Path,
    out_md: Path,
    title: str = "NAS-Bench-201 tabular search",
    paper: dict | None = None,
    benchmark_path: Path | None = None,
) -> pd.DataFrame:
    table = summarize(load_results(result_paths), paper, benchmark_path)
    write_table(table, out_csv, out_md, to_markdown(table, title))  # both or neither
    return table
