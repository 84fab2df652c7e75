"""Stage ``oqat-table``: the OQAT table, Pareto CSV and plot from ``oqat-search`` files (never MLflow).

- ``oqat.csv`` / ``.md``: one row per dataset x bit-width x BitOPs budget: test top-1 of the found cell (mean ±
  sample std over seeds), its validation top-1 (the search signal), BitOPs, the budget, the seeds and cells.
- ``oqat_pareto.csv``: every validation-Pareto point (BitOPs, val top-1, test top-1) of every search.
- ``oqat_pareto.png``: test top-1 vs BitOPs of those fronts, one colour per bit-width (matplotlib Agg).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from zsqpipe.errors import IntegrityError
from zsqpipe.io import atomic_path, markdown_table, mean_pm_std, read_json, write_table

REQUIRED = ["dataset", "bits", "seed", "found", "pareto", "max_bitops", "supernet", "wall_time_s"]
NOTE = (
    "OQAT on the {space} space (docs/methods/oqat.md): one LSQ-quantized weight-sharing supernet per bit-width "
    "(W = A bits; the lower bits inherit from the next higher one), searched under a BitOPs budget (fraction "
    "of the largest cell's BitOPs at that bit-width) by validation top-1 after BN recalibration, without "
    "retraining. test top-1 = test accuracy (%) of the found cell, read after the search; mean ± sample std "
    "over seeds. BitOPs = sum of MACs x weight_bits x act_bits over the quantized layers (stem and classifier FP)."
)


def load_searches(paths: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    found, pareto = [], []
    for p in paths:
        m = read_json(p)
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise IntegrityError(f"{p}: OQAT search file lacks {missing}")
        inh = m["supernet"].get("inherited_from") or {}
        base = {"dataset": m["dataset"], "bits": int(m["bits"]), "seed": int(m["seed"]),
                "inherited_from_bits": inh.get("bits"), "inherit_rule": inh.get("rule"),
                "wall_time_s": m["wall_time_s"]}  # fmt: skip
        for r in m["found"]:
            found.append({**base, "budget": r["budget"], "budget_bitops": r["budget_bitops"], "arch": r["arch"],
                          "val_acc": r["val_acc"], "test_acc": r["test_acc"], "bitops": r.get("bitops")})  # fmt: skip
        for r in m["pareto"]:
            pareto.append({"dataset": m["dataset"], "bits": int(m["bits"]), "seed": int(m["seed"]), "arch": r["arch"],
                           "bitops": r["bitops"], "oqat_mflops": r["oqat_mflops"], "val_acc": r["val_acc"],
                           "test_acc": r["test_acc"]})  # fmt: skip
    if not found:
        raise IntegrityError("oqat-table: no search files given")
    df = pd.DataFrame(found)
    dup = df.duplicated(["dataset", "bits", "seed", "budget"])
    if dup.any():
        raise IntegrityError(
            f"oqat-table: duplicate result for {df[dup].iloc[0][['dataset', 'bits', 'seed']].tolist()}"
        )
    return df, pd.DataFrame(pareto)


def _stats(s: pd.Series) -> tuple[float, float]:
    s = s.dropna().astype(float)
    if s.empty:
        return np.nan, np.nan
    return float(s.mean()), float(s.std(ddof=1)) if len(s) > 1 else np.nan


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (dataset, bits, budget), g in df.groupby(["dataset", "bits", "budget"], sort=False):
        t, t_sd = _stats(g["test_acc"])
        v, v_sd = _stats(g["val_acc"])
        b, _ = _stats(g["bitops"])
        rows.append({
            "dataset": dataset, "bits": int(bits), "budget": float(budget),
            "budget_mbitops": float(g["budget_bitops"].mean()) / 1e6,
            "n_seeds": int(g["test_acc"].notna().sum()), "seeds": " ".join(str(s) for s in sorted(g["seed"])),
            "test_top1_mean": t, "test_top1_std": t_sd, "val_top1_mean": v, "val_top1_std": v_sd,
            "mbitops_mean": b / 1e6, "archs": " ; ".join(str(a) for a in g.sort_values("seed")["arch"]),
            "cells": " ".join(short_arch(a) for a in g.sort_values("seed")["arch"]),
            "inherited_from_bits": g["inherited_from_bits"].iloc[0], "inherit_rule": g["inherit_rule"].iloc[0],
            "job_time_s_mean": float(g["wall_time_s"].mean()),
        })  # fmt: skip
    out = pd.DataFrame(rows)
    return out.sort_values(["dataset", "bits", "budget"], ascending=[True, False, True]).reset_index(
        drop=True
    )


CODES = {"none": "n", "skip_connect": "s", "nor_conv_1x1": "1", "nor_conv_3x3": "3", "avg_pool_3x3": "p"}
LEGEND = (
    "Cells: the ops on edges 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2 (n none, s skip, 1 conv1x1, 3 conv3x3, "
    "p avg-pool 3x3), one per seed; the CSV has the NB201 strings."
)


def short_arch(arch) -> str:
    """``|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...`` -> ``3ns...`` (edge order of the NB201 string); an OFA
    string (``k3e4-k5e6|...``) is already short and is returned as it is."""
    if not isinstance(arch, str):
        return "-"
    if not arch.startswith("|"):
        return arch
    from zsqpipe.nas.spaces.nb201 import str_to_arch

    return "".join(CODES[o] for o in str_to_arch(arch))


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = ["dataset", "W/A bits", "init", "budget (x max)", "budget (MBitOPs)", "seeds", "test top-1", "val top-1",
            "found MBitOPs", "found cells"]  # fmt: skip
    rows = []
    for _, r in table.iterrows():
        init = (
            "LSQ init"
            if pd.isna(r["inherited_from_bits"])
            else f"from w{int(r['inherited_from_bits'])} ({r['inherit_rule']})"
        )
        cells = [r["dataset"], f"{r['bits']}/{r['bits']}", init, f"{r['budget']:g}", f"{r['budget_mbitops']:.1f}",
                 r["seeds"], mean_pm_std(r["test_top1_mean"], r["test_top1_std"]), mean_pm_std(r["val_top1_mean"], r["val_top1_std"]),
                 f"{r['mbitops_mean']:.1f}", r["cells"]]  # fmt: skip
        rows.append(cells)
    nb201 = table["archs"].astype(str).str.startswith("|").all()
    notes = [NOTE.format(space="NB201" if nb201 else "OFA / MobileNetV3"), *([LEGEND] if nb201 else [])]
    return "\n".join(markdown_table(title, notes, cols, rows)) + "\n"


def plot_pareto(pareto: pd.DataFrame, found: pd.DataFrame, out_png: Path, title: str) -> None:
    """Test top-1 vs BitOPs of every search's validation-Pareto front (one line per seed, one colour per
    bit-width) and the found cells per budget (mean over seeds, error bar = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.get_cmap("tab10")
    for k, bits in enumerate(sorted(pareto["bits"].unique(), reverse=True) if len(pareto) else []):
        p = pareto[pareto["bits"] == bits]
        for j, ((_ds, _seed), g) in enumerate(p.groupby(["dataset", "seed"])):
            g = g.sort_values("bitops")
            ax.step(g["bitops"] / 1e6, g["test_acc"], where="post", color=colors(k), alpha=0.45, lw=1,
                    label=f"W{bits}A{bits} Pareto (val-selected)" if j == 0 else None)  # fmt: skip
            ax.scatter(g["bitops"] / 1e6, g["test_acc"], color=colors(k), s=10, alpha=0.6)
        f = found[(found["bits"] == bits) & found["test_acc"].notna()]
        if len(f):
            s = f.groupby("budget").agg(b=("bitops", "mean"), m=("test_acc", "mean"), sd=("test_acc", "std"))
            ax.errorbar(s["b"] / 1e6, s["m"], yerr=s["sd"].fillna(0), fmt="o", color=colors(k), mec="black",
                        capsize=3, label=f"W{bits}A{bits} found (per budget)")  # fmt: skip
    ax.set_xlabel("BitOPs (millions, quantized layers)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_oqat_table(
    paths: list[Path],
    out_csv: Path,
    out_md: Path,
    out_pareto: Path | None = None,
    out_plot: Path | None = None,
    title: str = "OQAT on NB201",
) -> pd.DataFrame:
    found, pareto = load_searches(paths)
    table = summarize(found)
    write_table(table, out_csv, out_md, to_markdown(table, title))  # both or neither
    if out_pareto is not None:
        with atomic_path(out_pareto) as tmp:
            pareto.to_csv(tmp, index=False, float_format="%.4f")
    if out_plot is not None:
        plot_pareto(pareto, found, out_plot, title)
    return table
