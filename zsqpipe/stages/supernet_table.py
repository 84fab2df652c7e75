"""Stage ``supernet-table``: the supernet ranking table from ``supernet-train`` metrics files (never MLflow).

One row per method x dataset x ground truth: Kendall-tau (supernet validation accuracy vs ground-truth test
accuracy) and the ground-truth test accuracy of the best-ranked cell, mean ± sample std over seeds; tau
against the ground-truth validation accuracy; the sample's best test accuracy; the published DYNAS numbers
(``paper``); wall times. A supernet trained on a table dataset (CIFAR-10/100) has one row per NB201 ground
truth (CIFAR-10, CIFAR-100, ImageNet16-120), as DYNAS reports; others have one row, against our own
stand-alone training (``truth`` = the dataset, ``truth_source`` = trained).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_table
from zsqpipe.nas.benchmark import DATASETS as NB201_DATASETS
from zsqpipe.nas.calr import METHODS

LABELS = {"spos": "SPOS", "spos_calr_ms": "SPOS+CaLR+MS"}
REQUIRED = ["dataset", "method", "seed", "n_archs", "truths", "groundtruth", "train_time_s", "wall_time_s"]

NOTE = (
    "tau = Kendall tau-b between the supernet's validation accuracy and the ground-truth test accuracy over "
    "the sampled cells (DYNAS protocol); tau (valid) = against the ground-truth validation accuracy; top-1 = "
    "ground-truth test accuracy (%) of the cell the supernet ranks best; sample best = best ground-truth test "
    "accuracy in the sample; mean ± sample std over seeds. Ground truth: NAS-Bench-201 (200 epochs) for "
    "CIFAR; otherwise our own short stand-alone training of each cell in the supernet's skeleton "
    "(docs/methods/supernet.md). paper = DYNAS (CVPR 2025), NB201 supernet trained on CIFAR-10, 3 runs."
)


def load_metrics(paths: list[Path]) -> pd.DataFrame:
    """One row per metrics file and ground truth."""
    rows = []
    for p in paths:
        m = read_json(p)
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise IntegrityError(f"{p}: supernet metrics lack {missing}")
        own = m["groundtruth"].get("truth", m["dataset"])
        for truth, t in m["truths"].items():
            rows.append(
                {
                    "method": m["method"],
                    "dataset": m["dataset"],
                    "truth": truth,
                    "truth_source": m["groundtruth"]["source"],
                    "own": truth == own,
                    "seed": m["seed"],
                    "n_archs": m["n_archs"],
                    "tau": np.nan if t["tau"] is None else t["tau"],  # null: undefined (constant scores)
                    "tau_valid": np.nan if t["tau_valid"] is None else t["tau_valid"],
                    "top1": t["top1"],
                    "sample_best_test": t["sample_best_test"],
                    "train_time_s": m["train_time_s"],
                    "wall_time_s": m["wall_time_s"],
                    "gt_wall_time_s": m["groundtruth"].get("wall_time_s", np.nan),
                }
            )
    if not rows:
        raise IntegrityError("supernet-table: no metrics files given")
    df = pd.DataFrame(rows)
    dup = df.duplicated(["method", "dataset", "truth", "seed"])
    if dup.any():
        raise IntegrityError(
            f"supernet-table: duplicate result for {df[dup].iloc[0][['method', 'dataset', 'seed']].tolist()}"
        )
    return df


def paper_value(paper: dict | None, method: str, truth: str, metric: str) -> tuple[float, float]:
    """Published (mean, std) from ``{method: {truth: {metric: {mean, std}}}}``; NaN where absent."""
    try:
        entry = paper[method][truth][metric]
        return float(entry["mean"]), float(entry.get("std", np.nan))
    except (KeyError, TypeError):
        return np.nan, np.nan


def _order(values, known) -> list:
    return sorted(values, key=lambda v: (known.index(v) if v in known else len(known), v))


def _stats(g: pd.Series) -> tuple[float, float]:
    return float(g.mean()), float(g.std(ddof=1)) if len(g) > 1 else np.nan


def summarize(df: pd.DataFrame, paper: dict | None = None) -> pd.DataFrame:
    out = []
    for dataset in sorted(df["dataset"].unique()):
        d = df[df["dataset"] == dataset]
        own = set(d[d["own"]]["truth"])
        others = [t for t in d["truth"].unique() if t not in own]
        truths = sorted(own) + _order(others, list(NB201_DATASETS))  # own ground truth first
        for truth in truths:
            for method in _order(d["method"].unique(), list(METHODS)):
                g = d[(d["truth"] == truth) & (d["method"] == method)]
                if g.empty:
                    continue
                tau, tau_sd = _stats(g["tau"])
                tv, tv_sd = _stats(g["tau_valid"])
                top, top_sd = _stats(g["top1"])
                ptau, ptau_sd = paper_value(paper, method, truth, "tau")
                ptop, ptop_sd = paper_value(paper, method, truth, "top1")
                out.append(
                    {
                        "method": method,
                        "label": LABELS.get(method, method),
                        "dataset": dataset,
                        "truth": truth,
                        "truth_source": g["truth_source"].iloc[0],
                        "n_seeds": len(g),
                        "seeds": " ".join(str(s) for s in sorted(g["seed"])),
                        "n_archs": int(g["n_archs"].iloc[0]),
                        "tau_mean": tau,
                        "tau_std": tau_sd,
                        "tau_valid_mean": tv,
                        "tau_valid_std": tv_sd,
                        "top1_mean": top,
                        "top1_std": top_sd,
                        "sample_best_test": float(g["sample_best_test"].iloc[0]),
                        "paper_tau": mean_pm_std(ptau, ptau_sd, 3),
                        "paper_top1": mean_pm_std(ptop, ptop_sd, 2),
                        "paper_tau_mean": ptau,
                        "paper_top1_mean": ptop,
                        "train_time_s_mean": float(g["train_time_s"].mean()),
                        "wall_time_s_mean": float(g["wall_time_s"].mean()),
                        "gt_wall_time_s": float(g["gt_wall_time_s"].iloc[0]),
                    }
                )
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = ["method", "dataset", "ground truth", "seeds", "cells", "tau", "tau (valid)", "top-1", "sample best",
            "paper tau", "paper top-1", "supernet job (min)"]  # fmt: skip
    rows = []
    for _, r in table.iterrows():
        truth = r["truth"] + (" (NB201)" if r["truth_source"] == "nasbench201" else " (ours)")
        cells = [
            r["label"],
            r["dataset"],
            truth,
            str(r["n_seeds"]),
            str(r["n_archs"]),
            mean_pm_std(r["tau_mean"], r["tau_std"], 3),
            mean_pm_std(r["tau_valid_mean"], r["tau_valid_std"], 3),
            mean_pm_std(r["top1_mean"], r["top1_std"], 2),
            f"{r['sample_best_test']:.2f}",
            r["paper_tau"],
            r["paper_top1"],
            f"{r['wall_time_s_mean'] / 60:.1f}",
        ]
        rows.append(cells)
    lines = markdown_table(title, [NOTE], cols, rows)
    gt = table.drop_duplicates("dataset")
    for _, r in gt.iterrows():
        if r["truth_source"] == "trained" and not np.isnan(r["gt_wall_time_s"]):
            lines.append("")
            lines.append(f"Ground truth of {r['dataset']}: {r['n_archs']} cells trained stand-alone, "
                         f"{r['gt_wall_time_s'] / 60:.1f} min of job time in total.")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_supernet_table(
    metrics_paths: list[Path],
    out_csv: Path,
    out_md: Path,
    title: str = "NB201 supernet ranking",
    paper: dict | None = None,
) -> pd.DataFrame:
    table = summarize(load_metrics(metrics_paths), paper)
    write_table(table, out_csv, out_md, to_markdown(table, title))  # both or neither
    return table
