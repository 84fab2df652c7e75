"""Figures for the Snakemake report: pure functions from tables/records to matplotlib Figures, and PNG writing.

- :func:`bits_figure`: test top-1 vs bit-width per method from a ``results/tables/<table>.csv`` (the
  ``aggregate`` stage). The **last-epoch** accuracy is the main series (solid); the **best-epoch** accuracy,
  which is selected on the test set, is drawn dashed and labelled as such, never instead of it.
- :func:`ablation_figure`: grouped bars (last epoch; best epoch hatched) per method/variant of a
  single-bit-width table such as ``hast_ablation``.
- :func:`deploy_figure`: fake-quant vs integer-ONNX top-1 per method (``results/tables/deploy.csv``).
- :func:`nas_curves_figure`: best validation accuracy found vs number of queries (mean over seeds, +-1 std
  band) per strategy, from ``zsqpipe search`` result files.

Only the object-oriented API is used (``matplotlib.figure.Figure`` + the Agg canvas): no pyplot, no global
backend or state, so the functions are safe to call from tests and other code. :func:`save_png` writes
through :func:`zsqpipe.io.atomic_path`.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import atomic_path, read_json

DEFAULT_STYLE = {"dpi": 120, "width": 6.4, "height": 4.4}
LAST_LABEL = "last epoch (no selection)"
BEST_LABEL = "best epoch (test-selected)"
FP_LABEL = "FP model"
TABLE_COLUMNS = ("dataset", "arch", "method", "weight_bits", "act_bits", "bits", "last_top1_mean", "best_top1_mean")


def _style(style: dict | None) -> dict:
    out = dict(DEFAULT_STYLE)
    out.update(style or {})
    return out


def _new_figure(n_panels: int, style: dict) -> tuple[Figure, list]:
    cols = min(n_panels, 2)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(style["width"] * cols, style["height"] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _suptitle(fig: Figure, text: str, fontsize: float = 11) -> None:
    """The figure title, wrapped to the figure's width (a long table title is never clipped at the edges)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))  # ~0.55 em per character
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise IntegrityError(f"plot: results table lacks columns {missing}")
    if table.empty:
        raise IntegrityError("plot: results table has no rows")


def _std(table: pd.DataFrame, column: str) -> np.ndarray | None:
    """Std column as error-bar lengths; None (no error bars) when absent or all NaN (a single seed),
    a NaN entry (one cell with one seed) as 0."""
    if column not in table or table[column].isna().all():
        return None
    return np.nan_to_num(table[column].to_numpy(dtype=float), nan=0.0)


def _ordered(values: Iterable[str], order: Sequence[str] | None) -> list[str]:
    values = list(dict.fromkeys(values))
    if not order:
        return values
    return [v for v in order if v in values] + [v for v in values if v not in order]


def _panels(table: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return [(key, g) for key, g in table.groupby(["dataset", "arch"], sort=True)]


def _fp_line(ax, g: pd.DataFrame) -> None:
    if "fp_top1" in g and g["fp_top1"].notna().any():
        ax.axhline(float(g["fp_top1"].mean()), color="0.35", linestyle=":", linewidth=1.2, label=FP_LABEL)


def bits_figure(
    table: pd.DataFrame,
    title: str | None = None,
    order: Sequence[str] | None = None,
    style: dict | None = None,
) -> Figure:
    """Test top-1 (%) vs bit-width, one line per method: last epoch solid with +-std error bars (main series),
    best epoch (test-selected) dashed in the same colour with its error bars, FP accuracy as a dotted line.
    One panel per dataset x arch; ``order``: method order (e.g. the config's), others follow."""
    _check_table(table)
    st = _style(style)
    panels = _panels(table)
    fig, axes = _new_figure(len(panels), st)
    colors = {}
    for ax, ((dataset, arch), g) in zip(axes, panels, strict=True):
        bits = g[["weight_bits", "act_bits", "bits"]].drop_duplicates().sort_values(["weight_bits", "act_bits"])
        pos = {b: i for i, b in enumerate(bits["bits"])}
        methods = _ordered(g["method"], order)
        n = len(methods)
        for k, method in enumerate(methods):
            m = g[g["method"] == method].sort_values(["weight_bits", "act_bits"])
            x = np.array([pos[b] for b in m["bits"]], dtype=float)
            dx = 0.06 * (k - (n - 1) / 2) if n > 1 else 0.0  # keep overlapping error bars apart
            color = colors.setdefault(method, f"C{len(colors) % 10}")
            ax.errorbar(x + dx, m["last_top1_mean"].to_numpy(float), yerr=_std(m, "last_top1_std"),
                        color=color, linestyle="-", marker="o", markersize=4, capsize=3, linewidth=1.6,
                        label=f"{method}: {LAST_LABEL}")  # fmt: skip
            ax.errorbar(x + dx, m["best_top1_mean"].to_numpy(float), yerr=_std(m, "best_top1_std"),
                        color=color, linestyle="--", marker="^", markersize=4, capsize=2, linewidth=1.0,
                        alpha=0.6, label=f"{method}: {BEST_LABEL}")  # fmt: skip
        _fp_line(ax, g)
        ax.set_xticks(range(len(pos)), list(pos))
        ax.set_xlim(-0.5, len(pos) - 0.5)
        ax.set_xlabel("bit-width (weights / activations)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{dataset} / {arch}", fontsize=10)
        ax.grid(True, alpha=0.3)
        handles = [Line2D([], [], color=colors[m], linewidth=2) for m in methods]
        ax.legend(handles, methods, title="method", fontsize=8, loc="best")
    fig.legend(
        [
            Line2D([], [], color="k", linestyle="-", marker="o"),
            Line2D([], [], color="k", linestyle="--", marker="^", alpha=0.6),
            Line2D([], [], color="0.35", linestyle=":"),
        ],
        [f"solid: {LAST_LABEL}", f"dashed: {BEST_LABEL}", f"dotted: {FP_LABEL}"],
        fontsize=7.5,
        loc="outside lower center",
        ncols=3,
    )
    _suptitle(fig, title or "Accuracy vs bit-width (mean ± std over seeds)")
    return fig


def _paired_bars(ax, methods: list[str], solid, solid_err, hatched, hatched_err, labels: tuple[str, str],
                 width: float = 0.38):  # fmt: skip
    """Two bars per method, one colour per method: ``solid`` (left) and ``hatched`` (right), +-std error bars
    (None: none), labelled ``labels``; x ticks, y label and grid. Returns the bars' x centres (left, right)."""
    x = np.arange(len(methods), dtype=float)
    colors = [f"C{i % 10}" for i in range(len(methods))]
    ax.bar(x - width / 2, solid, width, yerr=solid_err, capsize=3, color=colors, edgecolor="k", linewidth=0.6,
           label=labels[0])  # fmt: skip
    ax.bar(x + width / 2, hatched, width, yerr=hatched_err, capsize=3, color=colors, alpha=0.45, hatch="//",
           edgecolor="k", linewidth=0.6, label=labels[1])  # fmt: skip
    ax.set_xticks(x, methods, rotation=20 if len(methods) > 4 else 0)
    ax.set_ylabel("test top-1 (%)")
    ax.grid(True, axis="y", alpha=0.3)
    return x - width / 2, x + width / 2


def _paired_legend(fig: Figure, solid: str, hatched: str, fp_line: bool = False) -> None:
    """The figure legend of :func:`_paired_bars` (+ the dotted FP line)."""
    handles = [Patch(facecolor="0.6", edgecolor="k"), Patch(facecolor="0.6", alpha=0.45, hatch="//", edgecolor="k")]
    labels = [f"solid: {solid}", f"hatched: {hatched}"]
    if fp_line:
        handles.append(Line2D([], [], color="0.35", linestyle=":"))
        labels.append(f"dotted: {FP_LABEL}")
    fig.legend(handles, labels, fontsize=7.5, loc="outside lower center", ncols=len(handles))


def ablation_figure(
    table: pd.DataFrame,
    title: str | None = None,
    order: Sequence[str] | None = None,
    style: dict | None = None,
) -> Figure:
    """Grouped bars per method/variant: last-epoch top-1 (solid) and best-epoch top-1 (hatched, selected on
    the test set), mean with +-std error bars, the FP accuracy as a dotted line. One panel per dataset x
    arch x bit-width."""
    _check_table(table)
    st = _style(style)
    groups = [(key, g) for key, g in table.groupby(["dataset", "arch", "weight_bits", "act_bits"], sort=True)]
    fig, axes = _new_figure(len(groups), st)
    for ax, ((dataset, arch, _w, _a), g) in zip(axes, groups, strict=True):
        methods = _ordered(g["method"], order)
        rows = g.set_index("method").loc[methods]
        last, best = rows["last_top1_mean"].to_numpy(float), rows["best_top1_mean"].to_numpy(float)
        last_err = _std(rows, "last_top1_std")
        best_err = _std(rows, "best_top1_std")
        x_last, x_best = _paired_bars(ax, methods, last, last_err, best, best_err, (LAST_LABEL, BEST_LABEL))
        for xs, vals, err in [(x_last, last, last_err), (x_best, best, best_err)]:
            for xi, v, e in zip(xs, vals, err if err is not None else np.zeros(len(vals)), strict=True):
                ax.annotate(f"{v:.1f}", (xi, v + e), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
        _fp_line(ax, g)
        lo = np.nanmin(np.concatenate([last - (last_err if last_err is not None else 0), best]))
        hi = max(np.nanmax(np.concatenate([last, best])), float(g["fp_top1"].max()) if "fp_top1" in g else 0)
        ax.set_ylim(max(0.0, 5 * np.floor((lo - 5) / 5)), min(100.0, hi + 4))
        ax.set_title(f"{dataset} / {arch} / {g['bits'].iloc[0]}", fontsize=10)
    _paired_legend(fig, LAST_LABEL, BEST_LABEL, fp_line=True)
    _suptitle(fig, title or "Ablation (mean ± std over seeds)")
    return fig


def steps_figure(
    table: pd.DataFrame,
    steps: dict[str, tuple[str, int]],
    title: str | None = None,
    order: Sequence[str] | None = None,
    style: dict | None = None,
) -> Figure:
    """Test top-1 (%) vs student optimizer steps (log axis), one line per base method through its variants
    (``steps``: table method/variant -> (base method, steps)): last epoch solid with +-std error bars,
    val-selected dashed in the same colour, FP accuracy dotted; a method with 0 steps only (``ptq``) is a
    dash-dot level line at its last-epoch mean. One panel per dataset x arch x bit-width;
    ``order``: variant order (a base method is drawn where its first variant appears)."""
    _check_table(table)
    missing = sorted(set(table["method"]) - set(steps))
    if missing:
        raise ConfigError(f"steps plot: no step count for {missing}; expected one per method/variant")
    st = _style(style)
    groups = [(key, g) for key, g in table.groupby(["dataset", "arch", "weight_bits", "act_bits"], sort=True)]
    fig, axes = _new_figure(len(groups), st)
    colors: dict[str, str] = {}
    for ax, ((dataset, arch, _w, _a), g) in zip(axes, groups, strict=True):
        g = g.assign(base=[steps[m][0] for m in g["method"]], steps=[int(steps[m][1]) for m in g["method"]])
        bases = list(dict.fromkeys(steps[m][0] for m in _ordered(g["method"], order)))
        xs = sorted(set(g["steps"]) - {0}) or [0]
        for base in bases:
            m = g[g["base"] == base].sort_values("steps")
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            if (m["steps"] == 0).all() and xs != [0]:  # calibration only (ptq): a level line, not a point at 0
                ax.axhline(float(m["last_top1_mean"].mean()), color=color, linestyle="-.", linewidth=1.2,
                           label=f"{base} (0 steps)")  # fmt: skip
                continue
            m = m[m["steps"] > 0] if xs != [0] else m
            x = m["steps"].to_numpy(float)
            ax.errorbar(x, m["last_top1_mean"].to_numpy(float), yerr=_std(m, "last_top1_std"), color=color,
                        linestyle="-", marker="o", markersize=4, capsize=3, linewidth=1.6, label=base)  # fmt: skip
            ax.errorbar(x, m["val_selected_top1_mean"].to_numpy(float), yerr=_std(m, "val_selected_top1_std"),
                        color=color, linestyle="--", marker="^", markersize=3, capsize=2, linewidth=1.0,
                        alpha=0.6)  # fmt: skip
        _fp_line(ax, g)
        if min(xs) > 0:  # 0-step methods are level lines; only a table of them alone keeps the axis linear
            ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("student optimizer steps")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{dataset} / {arch} / {g['bits'].iloc[0]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))  # a ±std bar past 100 % is not an accuracy
        ax.legend(title="method", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.legend(
        [Line2D([], [], color="k", linestyle="-", marker="o"),
         Line2D([], [], color="k", linestyle="--", marker="^", alpha=0.6),
         Line2D([], [], color="0.35", linestyle=":")],
        ["solid: last epoch", "dashed: at the best validation epoch", f"dotted: {FP_LABEL}"],
        fontsize=7.5, loc="outside lower center", ncols=3,
    )  # fmt: skip
    _suptitle(fig, title or "Accuracy vs fine-tuning steps (mean ± std over seeds)")
    return fig


def search_records(content: dict, path: str | os.PathLike = "search result") -> list[dict]:
    """The per-seed records of a ``zsqpipe search`` result file (one record: the older one-seed layout)."""
    records = content.get("records", [content])
    if not records:
        raise IntegrityError(f"{path}: search result without records")
    return records


def best_so_far(record: dict, path: str | os.PathLike = "search result") -> np.ndarray:
    """Best validation accuracy after each query of one search (``best_valid_so_far``, else recomputed
    from the per-query ``history`` of [index, valid_acc] pairs)."""
    if record.get("best_valid_so_far"):
        return np.asarray(record["best_valid_so_far"], dtype=float)
    if record.get("history"):
        return np.maximum.accumulate(np.asarray([h[1] for h in record["history"]], dtype=float))
    raise IntegrityError(f"{path}: search record (seed {record.get('seed')}) has no per-query history")


def search_curve(records: list[dict], path: str | os.PathLike = "search result"):
    """(queries 1..Q, mean, std) of the best-so-far validation accuracy over seeds; a search that stopped
    early keeps its last value (the best found does not change without queries)."""
    curves = [best_so_far(r, path) for r in records]
    q = max(len(c) for c in curves)
    padded = np.stack([np.pad(c, (0, q - len(c)), mode="edge") for c in curves])
    std = padded.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(q)
    return np.arange(1, q + 1), padded.mean(axis=0), std


def nas_curves_figure(
    results: list[dict],
    title: str | None = None,
    order: Sequence[str] | None = None,
    optimum: dict[str, float] | None = None,
    style: dict | None = None,
) -> Figure:
    """Best validation accuracy found vs number of queries, mean over seeds with a +-1 std band, one line
    per strategy and one panel per dataset. ``results``: contents of search result files (each a dataset x
    strategy); ``optimum``: {dataset: best validation accuracy of any cell} drawn as a dotted reference."""
    if not results:
        raise IntegrityError("plot: no search results given")
    st = _style(style)
    by_dataset: dict[str, list[dict]] = {}
    for res in results:
        recs = search_records(res)
        by_dataset.setdefault(res.get("dataset") or recs[0]["dataset"], []).append(res)
    fig, axes = _new_figure(len(by_dataset), st)
    strategies = _ordered([r.get("strategy") or search_records(r)[0]["strategy"] for r in results], order)
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    for ax, (dataset, items) in zip(axes, sorted(by_dataset.items()), strict=True):
        items = sorted(
            items, key=lambda r: strategies.index(r.get("strategy") or search_records(r)[0]["strategy"])
        )
        for res in items:
            recs = search_records(res)
            strategy = res.get("strategy") or recs[0]["strategy"]
            x, mean, std = search_curve(recs)
            ax.plot(x, mean, color=colors[strategy], linewidth=1.6, label=f"{strategy} ({len(recs)} seeds)")
            ax.fill_between(x, mean - std, mean + std, color=colors[strategy], alpha=0.2, linewidth=0)
        if optimum and dataset in optimum:
            ax.axhline(optimum[dataset], color="0.35", linestyle=":", linewidth=1.2,
                       label="best validation accuracy in the table")  # fmt: skip
        ax.set_xlabel("queries")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("best validation accuracy found (%)")
        ax.set_title(dataset, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="mean ± 1 std over seeds", title_fontsize=7)
    _suptitle(fig, title or "NAS search: best validation accuracy vs queries")
    return fig


DEPLOY_COLUMNS = ("dataset", "arch", "method", "bits", "fake_top1_mean", "int_top1_mean", "disagree_pct_mean")


DEPLOY_LABELS = ("fake-quant PyTorch (last epoch)", "integer ONNX on onnxruntime")


def deploy_figure(
    table: pd.DataFrame,
    title: str | None = None,
    order: Sequence[str] | None = None,
    style: dict | None = None,
) -> Figure:
    """Per method: the fake-quantized PyTorch model's last-epoch test top-1 (solid) next to the same model run
    by onnxruntime on integer kernels (hatched), mean +-std over seeds, with the share of test images whose
    prediction differs above each pair. One panel per dataset x arch x bit-width (``results/tables/deploy.csv``)."""
    missing = [c for c in DEPLOY_COLUMNS if c not in table.columns]
    if missing:
        raise IntegrityError(f"deploy table lacks columns {missing}; expected the deploy-table output")
    st = _style(style)
    groups = [(key, g) for key, g in table.groupby(["dataset", "arch", "bits"], sort=True)]
    fig, axes = _new_figure(len(groups), st)
    for ax, ((dataset, arch, bits), g) in zip(axes, groups, strict=True):
        methods = _ordered(g["method"], order)
        rows = g.set_index("method").loc[methods]
        fake, integer = rows["fake_top1_mean"].to_numpy(float), rows["int_top1_mean"].to_numpy(float)
        fake_err, int_err = _std(rows, "fake_top1_std"), _std(rows, "int_top1_std")
        x_fake, x_int = _paired_bars(ax, methods, fake, fake_err, integer, int_err, DEPLOY_LABELS)
        tops = np.maximum(fake + (fake_err if fake_err is not None else 0), integer + (int_err if int_err is not None else 0))
        for xi, top, d in zip((x_fake + x_int) / 2, tops, rows["disagree_pct_mean"], strict=True):
            ax.annotate(f"{d:.2f} % differ", (xi, top), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
        lo = np.nanmin(np.concatenate([fake, integer]))
        ax.set_ylim(max(0.0, 5 * np.floor((lo - 5) / 5)), min(100.0, np.nanmax(tops) + 5))
        ax.set_title(f"{dataset} / {arch} / {bits}", fontsize=10)
    _paired_legend(fig, *DEPLOY_LABELS)
    _suptitle(fig, title or "Integer deployment: fake-quant vs integer top-1 (mean ± std over seeds)")
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi or DEFAULT_STYLE["dpi"], metadata={"Software": None})
    return path


KINDS = ("bits", "ablation", "steps", "nas_curves", "deploy")


def run_plot(
    kind: str,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    title: str | None = None,
    order: Sequence[str] | None = None,
    optimum: dict[str, float] | None = None,
    style: dict | None = None,
    methods: dict[str, dict] | None = None,
) -> Path:
    """Files in, PNG out: ``bits``/``ablation``/``steps`` read one results-table CSV (``steps`` also needs
    ``methods``: method/variant -> {"method": base method, "cfg": its ``methods.<base>`` config}, from which
    the student steps are computed), ``nas_curves`` search result JSON files. Returns the written path."""
    st = _style(style)
    unknown = sorted(set(st) - set(DEFAULT_STYLE))
    if unknown:
        raise ConfigError(f"plot style: unknown keys {unknown}; expected {sorted(DEFAULT_STYLE)}")
    if kind in ("bits", "ablation", "deploy"):
        if len(inputs) != 1:
            raise ConfigError(f"plot --kind {kind}: expected one results table, got {len(inputs)} files")
        table = pd.read_csv(inputs[0])
        fn = {"bits": bits_figure, "ablation": ablation_figure, "deploy": deploy_figure}[kind]
        fig = fn(table, title, order, st)
    elif kind == "steps":
        if len(inputs) != 1 or not methods:
            raise ConfigError(
                'plot --kind steps: expected one results table and --methods ({name: {"method": base, "cfg": {...}}})'
            )
        from zsqpipe.budget import student_steps

        steps = {name: (m["method"], student_steps(m["method"], m.get("cfg"))) for name, m in methods.items()}
        fig = steps_figure(pd.read_csv(inputs[0]), steps, title, order, st)
    elif kind == "nas_curves":
        fig = nas_curves_figure([read_json(p) for p in inputs], title, order, optimum, st)
    else:
        raise ConfigError(f"plot --kind: {kind!r} is not one of {list(KINDS)}")
    return save_png(fig, out, st["dpi"])
