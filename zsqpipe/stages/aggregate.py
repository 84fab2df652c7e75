"""Stage ``aggregate``: build result tables from ``metrics.json`` files (never from MLflow).

One row per dataset x arch x method x bit-width: FP accuracy, mean +- std over seeds of last-epoch,
best-epoch (test-selected) and validation-selected test top-1, the number of seeds, and the wall time.
Writes a CSV and a Markdown copy (the Markdown says how each column was selected). With a ``reference`` method,
every other row also gets the paired difference reference − row (same seeds) of last-epoch test top-1. Rows of
QAT runs carry the summed latent-weight LR (``latent_lr_sum_mean``) and, for TALR, when it starts regulating.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_table

KEYS = ["dataset", "arch", "method", "weight_bits", "act_bits"]
ACCURACIES = ["last_top1", "best_top1", "val_selected_top1"]
# per-cell run summaries (evaluate.summary_scalars) averaged over seeds when present: summed latent-weight LR,
# TALR's first regulating step (median over layers), the fraction of layers that reach it, and R^t/R^0 there
RUN_SUMMARIES = ["latent_lr_sum_mean", "talr_regulating_step_median", "talr_regulating_fraction",
                 "talr_regulating_target_median"]  # fmt: skip

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
    df = pd.DataFrame(rows)
    dup = df.duplicated(KEYS + ["seed"])
    if dup.any():
        cell = df[dup].iloc[0][KEYS + ["seed"]].to_dict()
        raise IntegrityError(f"aggregate: more than one metrics file for the cell and seed {cell}")
    return df


def paper_value(paper: dict | None, row: dict) -> float:
    """Published top-1 for a row from ``{dataset: {arch: {method: {"w4a4": value}}}}`` (NaN if absent)."""
    try:
        return float(paper[row["dataset"]][row["arch"]][row["method"]][f"w{row['weight_bits']}a{row['act_bits']}"])
    except (KeyError, TypeError):
        return np.nan


def paired_difference(df: pd.DataFrame, row: dict, reference: str) -> tuple[float, float, int]:
    """Mean, sample std and count over the shared seeds of (reference − row.method) last-epoch test top-1 in the
    same dataset, arch and bits (NaN, NaN, 0 without shared seeds)."""
    same = (df["dataset"] == row["dataset"]) & (df["arch"] == row["arch"])
    same &= (df["weight_bits"] == row["weight_bits"]) & (df["act_bits"] == row["act_bits"])
    ref = df[same & (df["method"] == reference)].set_index("seed")["last_top1"]
    own = df[same & (df["method"] == row["method"])].set_index("seed")["last_top1"]
    d = (ref - own).dropna()
    if d.empty:
        return np.nan, np.nan, 0
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else np.nan, len(d)


def summarize(df: pd.DataFrame, paper: dict | None = None, reference: str | None = None) -> pd.DataFrame:
    """Group by cell and compute mean/std over seeds (plus the published number, when given, and the paired
    difference to the ``reference`` method)."""
    if reference is not None and reference not in set(df["method"]):
        raise IntegrityError(f"aggregate: reference method {reference!r} has no metrics in this table")
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
        for col in RUN_SUMMARIES:
            if col in g and g[col].notna().any():
                row[col] = float(g[col].mean())
        row["paper_top1"] = paper_value(paper, row)
        if reference is not None and row["method"] != reference:
            d = paired_difference(df, row, reference)
            row["ref_minus_last_mean"], row["ref_minus_last_std"], row["ref_minus_n"] = d[0], d[1], int(d[2])
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str, reference: str | None = None) -> str:
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
    notes = [NOTE]
    if reference is not None:
        cols.append(f"{reference} − row (paired, last)")
        for row, (_, r) in zip(rows, table.iterrows(), strict=True):
            n = r.get("ref_minus_n", 0)
            row.append("" if pd.isna(n) or not n else
                       f"{mean_pm_std(r['ref_minus_last_mean'], r['ref_minus_last_std'])} ({int(n)})")  # fmt: skip
        notes.append(f"{reference} − row: last-epoch test top-1 of {reference} minus this row's, per seed (same "
                     "dataset, arch, bits), mean ± std over the seeds both have (count in brackets).")  # fmt: skip
    if "latent_lr_sum_mean" in table:
        cols.append("Σ LR (latent)")
        for row, (_, r) in zip(rows, table.iterrows(), strict=True):
            row.append("" if np.isnan(r.get("latent_lr_sum_mean", np.nan)) else f"{r['latent_lr_sum_mean']:.3f}")
        notes.append("Σ LR (latent): the learning rate the quantized layers' latent weights received, summed over "
                     "the training steps (TALR: sum of U; mean over layers and seeds).")  # fmt: skip
    if "talr_regulating_fraction" in table:
        cols.append("TALR regulates from step")
        for row, (_, r) in zip(rows, table.iterrows(), strict=True):
            row.append(regulating_text(r))
        notes.append("TALR regulates from step: the first step at which U falls (running transition rate K above "
                     "its target R), median over layers, mean over the seeds where some layer reached it; the "
                     "share of layers that reach it (mean over all seeds); R/R⁰ there (near 0: only the decayed "
                     "end of the target schedule was reached).")  # fmt: skip
    return "\n".join(markdown_table(title, notes, cols, rows)) + "\n"


def regulating_text(r: pd.Series) -> str:
    frac = r.get("talr_regulating_fraction", np.nan)
    if np.isnan(frac):
        return ""
    if frac == 0:
        return "never (0 % of layers)"
    step, target = r.get("talr_regulating_step_median", np.nan), r.get("talr_regulating_target_median", np.nan)
    return f"{step:.0f} ({frac:.0%} of layers, R/R⁰ {target:.2f})"


def run_aggregate(
    metrics_paths: list[Path],
    out_csv: Path,
    out_md: Path,
    title: str = "zsqpipe results",
    paper: dict | None = None,
    reference: str | None = None,
) -> pd.DataFrame:
    table = summarize(load_metrics(metrics_paths), paper, reference)
    write_table(table, out_csv, out_md, to_markdown(table, title, reference))  # both or neither
    return table
