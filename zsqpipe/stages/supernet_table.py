"""Stage ``supernet-table``: the supernet ranking table from ``supernet-train`` metrics files (never MLflow).

One row per method x dataset x ground truth: Kendall-tau (supernet validation accuracy vs ground-truth test
accuracy) and the ground-truth test accuracy of the best-ranked cell, mean ± sample std over seeds; tau
against the ground-truth validation accuracy; the sample's best test accuracy; the published DYNAS numbers
(``paper``); wall times. A supernet trained on a table dataset (CIFAR-10/100) has one row per NB201 ground
truth (CIFAR-10, CIFAR-100, ImageNet16-120), as DYNAS reports; others have one row, against our own
stand-alone training (``truth`` = the dataset, ``truth_source`` = trained).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import markdown_table, mean_pm_std, read_json, write_table
from zsqpipe.nas.benchmark import DATASETS as NB201_DATASETS
from zsqpipe.nas.ranking import kendall_tau

LABELS = {"spos": "SPOS", "spos_calr": "SPOS+CaLR", "spos_ms": "SPOS+MS", "spos_calr_ms": "SPOS+CaLR+MS",
          "spos_lr_matched": "SPOS, LR sum = CaLR's"}  # the default supernet.variants and the two methods
ORDER = list(LABELS)
BOOTSTRAP = 2000  # resamples of the 95 % intervals on tau (seeded: the table is reproducible)
REQUIRED = ["dataset", "method", "seed", "n_archs", "truths", "groundtruth", "train_time_s", "wall_time_s"]

NOTE = (
    "tau = Kendall tau-b between the supernet's validation accuracy and the ground-truth test accuracy over "
    "the sampled cells (DYNAS protocol); tau (valid) = against the ground-truth validation accuracy; top-1 = "
    "ground-truth test accuracy (%) of the cell the supernet ranks best; sample best = best ground-truth test "
    "accuracy in the sample; mean ± sample std over seeds. Ground truth: NAS-Bench-201 (200 epochs) for "
    "CIFAR; otherwise our own short stand-alone training of each cell in the supernet's skeleton "
    "(docs/methods/supernet.md). paper = DYNAS (CVPR 2025), NB201 supernet trained on CIFAR-10, 3 runs. "
    "95 % CI = percentile bootstrap of the mean tau over seeds and cells (own ground truth; cells resampled "
    "jointly across seeds, as every seed ranks the same sample); vs SPOS = the paired difference of mean tau to "
    "SPOS on the same seeds and resampled cells."
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
        cells = {c["arch"]: (c["supernet_valid_acc"], c["gt_test_acc"]) for c in m.get("subnets", [])}
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
                    "gt_seed_tau": (m["groundtruth"].get("seed_tau") if truth == own else None) or np.nan,
                    "cells": cells if truth == own else {},
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


def _taus(runs: list[tuple[np.ndarray, np.ndarray]], cells: np.ndarray) -> np.ndarray:
    return np.array([kendall_tau(est[cells], truth[cells]) for est, truth in runs])


def bootstrap_tau(
    runs: dict[int, dict], base: dict[int, dict] | None = None, n: int | None = None, seed: int = 0
) -> dict[str, float]:
    """95 % percentile intervals of the mean Kendall tau over seeds, resampling seeds and cells (the cells
    jointly across seeds: every seed ranks the same sample), and of its paired difference to ``base`` (the
    same seeds and resampled cells). ``runs``: seed -> {arch: (supernet estimate, ground truth)}."""
    nan = {"tau_ci_low": np.nan, "tau_ci_high": np.nan, "dtau_mean": np.nan, "dtau_ci_low": np.nan,
           "dtau_ci_high": np.nan}  # fmt: skip
    archs = sorted(set.intersection(*(set(c) for c in runs.values()))) if runs else []
    if len(archs) < 3:
        return nan
    seeds = sorted(runs)
    paired = [s for s in seeds if base and s in base and set(archs) <= set(base[s])]

    def arrays(source, keep):
        return [tuple(np.array([source[s][a][i] for a in archs], dtype=float) for i in (0, 1)) for s in keep]

    own, ref = arrays(runs, seeds), arrays(base, paired) if paired else None
    in_own = [seeds.index(s) for s in paired]  # the paired seeds' positions in ``own``
    rng = np.random.default_rng(seed)
    means, diffs = [], []
    with warnings.catch_warnings():  # a draw of one repeated cell: tau NaN, its mean warns
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        for _ in range(n or BOOTSTRAP):
            cells = rng.integers(0, len(archs), len(archs))
            pick = rng.integers(0, len(seeds), len(seeds))
            taus = _taus(own, cells)
            means.append(np.nanmean(taus[pick]))
            if ref:
                pick = rng.integers(0, len(paired), len(paired))
                diffs.append(np.nanmean((taus[in_own] - _taus(ref, cells))[pick]))
    out = dict(nan, tau_ci_low=float(np.nanpercentile(means, 2.5)), tau_ci_high=float(np.nanpercentile(means, 97.5)))
    if ref:
        full = np.arange(len(archs))
        out.update(dtau_mean=float(np.nanmean(_taus(own, full)[in_own] - _taus(ref, full))),
                   dtau_ci_low=float(np.nanpercentile(diffs, 2.5)),
                   dtau_ci_high=float(np.nanpercentile(diffs, 97.5)))  # fmt: skip
    return out


def summarize(df: pd.DataFrame, paper: dict | None = None) -> pd.DataFrame:
    out = []
    for dataset in sorted(df["dataset"].unique()):
        d = df[df["dataset"] == dataset]
        own = set(d[d["own"]]["truth"])
        others = [t for t in d["truth"].unique() if t not in own]
        truths = sorted(own) + _order(others, list(NB201_DATASETS))  # own ground truth first
        for truth in truths:
            base = d[(d["truth"] == truth) & (d["method"] == "spos")]
            base_runs = {r.seed: r.cells for r in base.itertuples() if r.cells}
            for method in _order(d["method"].unique(), ORDER):
                g = d[(d["truth"] == truth) & (d["method"] == method)]
                if g.empty:
                    continue
                runs = {r.seed: r.cells for r in g.itertuples() if r.cells}
                ci = bootstrap_tau(runs, base_runs if method != "spos" else None)
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
                        **ci,
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
                        "gt_seed_tau": float(g["gt_seed_tau"].iloc[0]),
                    }
                )
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = ["method", "dataset", "ground truth", "seeds", "cells", "tau", "tau 95 % CI", "tau − SPOS [95 % CI]",
            "tau (valid)", "top-1", "sample best", "paper tau", "paper top-1", "supernet job (min)"]  # fmt: skip
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
            "" if np.isnan(r["tau_ci_low"]) else f"[{r['tau_ci_low']:.3f}, {r['tau_ci_high']:.3f}]",
            "" if np.isnan(r["dtau_mean"]) else
            f"{r['dtau_mean']:+.3f} [{r['dtau_ci_low']:+.3f}, {r['dtau_ci_high']:+.3f}]",
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
            ceiling = ("" if np.isnan(r["gt_seed_tau"]) else f" Its own ceiling: Kendall tau "
                       f"{r['gt_seed_tau']:.3f} between two stand-alone trainings (seeds) of the same cells.")
            lines.append(f"Ground truth of {r['dataset']}: {r['n_archs']} cells trained stand-alone, "
                         f"{r['gt_wall_time_s'] / 60:.1f} min of job time in total.{ceiling}")  # fmt: skip
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
