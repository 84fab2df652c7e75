"""Stage ``aggregate``: build result tables from ``metrics.json`` files (never from MLflow).

One row per dataset x arch x method x bit-width: FP accuracy, mean +- std over seeds of last-epoch,
best-epoch (test-selected) and validation-selected test top-1, the number of seeds, and the wall time.
Writes a CSV and a Markdown copy (the Markdown says how each column was selected).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_table

KEYS = ["dataset", "arch", "method", "weight_bits", "act_bits"]
ACCURACIES = ["last_top1", "best_top1", "val_selected_top1"]

NOTE = (
    "last = test top-1 after the final epoch; best = highest test top-1 over epochs (model selection on the "
    "test set, as GDFQ/IntraQ/HAST/ZAQ report it); val-sel = test top-1 at the epoch with the best validation "
    "accuracy. Values are mean ± sample std over seeds (std blank for a single seed). paper = the published "
    "number for the same dataset/arch/method/bits (best-epoch, as the papers select), when the config lists one."
)


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for p in paths:
        m = read_json(p)
        missing = [k for k in KEYS + ["seed"] + ACCURACIES if k not in m]
        if missing:
            raise IntegrityError(f"{p}: metrics file lacks {missing}")
        rows.append(m)
    if not rows:
        raise IntegrityError("aggregate: no metrics files given")
    return pd.DataFrame(rows)


def paper_value(paper: dict | None, row: dict) -> float:
    """Published top-1 for a row from ``{dataset: {arch: {method: {"w4a4": value}}}}`` (NaN if absent)."""
    try:
        return float(paper[row["dataset"]][row["arch"]][row["method"]][f"w{row['weight_bits']}a{row['act_bits']}"])
    except (KeyError, TypeError):
        return np.nan


def summarize(df: pd.DataFrame, paper: dict | None = None) -> pd.DataFrame:
    """Group by cell and compute mean/std over seeds (plus the published number, when given)."""
    out = []
    for key, g in df.groupby(KEYS, sort=True):
        row = dict(zip(KEYS, key, strict=True))
        row["bits"] = f"W{row['weight_bits']}A{row['act_bits']}"
        row["fp_top1"] = float(g["fp_top1"].mean()) if "fp_top1" in g else np.nan
        row["n_seeds"] = len(g)
        row["seeds"] = " ".join(str(s) for s in sorted(g["seed"]))
        for col in ACCURACIES:
            row[f"{col}_mean"] = float(g[col].mean())
            row[f"{col}_std"] = float(g[col].std(ddof=1)) if len(g) > 1 else np.nan
        row["wall_time_s_mean"] = float(g["wall_time_s"].mean())
        for col in ("model_size_bits", "bitops", "macs"):
            if col in g:
                row[col] = float(g[col].mean())
        row["paper_top1"] = paper_value(paper, row)
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = [
        "dataset",
        "arch",
        "method",
        "bits",
        "FP",
        "seeds",
        "paper",
        "last",
        "best (test-selected)",
        "val-sel",
        "wall s",
        "size KiB",
        "BitOPs (G)",
    ]
    rows = [
        [
            r["dataset"],
            r["arch"],
            r["method"],
            r["bits"],
            f"{r['fp_top1']:.2f}",
            f"{r['n_seeds']} ({r['seeds']})",
            "" if np.isnan(r["paper_top1"]) else f"{r['paper_top1']:.2f}",
            mean_pm_std(r["last_top1_mean"], r["last_top1_std"]),
            mean_pm_std(r["best_top1_mean"], r["best_top1_std"]),
            mean_pm_std(r["val_selected_top1_mean"], r["val_selected_top1_std"]),
            f"{r['wall_time_s_mean']:.0f}",
            f"{r.get('model_size_bits', np.nan) / 8 / 1024:.1f}",
            f"{r.get('bitops', np.nan) / 1e9:.3f}",
        ]
        for _, r in table.iterrows()
    ]
    return "\n".join(markdown_table(title, [NOTE], cols, rows)) + "\n"


def run_aggregate(
    metrics_paths: list[Path],
    out_csv: Path,
    out_md: Path,
    title: str = "zsqpipe results",
    paper: dict | None = None,
) -> pd.DataFrame:
    table = summarize(load_metrics(metrics_paths), paper)
    write_table(table, out_csv, out_md, to_markdown(table, title))  # both or neither
    return table
