"""Ranking quality of a supernet: Kendall-tau between supernet-estimated and ground-truth accuracies.

DYNAS protocol (``train_spos.py``): ``scipy.stats.kendalltau`` (tau-b) on a fixed list of 327 NB201 cells
(``kendal_320_idx.pkl``; the ``kendall_subset`` column of the shipped NB201 table), against the ground-truth
test accuracies of CIFAR-10, CIFAR-100 and ImageNet16-120. The subset is passed in by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from zsqpipe.errors import ConfigError
from zsqpipe.nas.calr import as_arch
from zsqpipe.nas.spaces.nb201 import Arch


def kendall_tau(estimated: Sequence[float], truth: Sequence[float]) -> float:
    """Kendall's tau-b of two aligned score lists (scipy's default variant, as DYNAS). NaN when either
    list is constant or has fewer than 2 entries."""
    est = np.asarray(estimated, dtype=float)
    tru = np.asarray(truth, dtype=float)
    if est.shape != tru.shape or est.ndim != 1:
        raise ConfigError(f"kendall_tau: expected two lists of equal length, got {est.shape} and {tru.shape}")
    if len(est) < 2:
        return math.nan
    return float(stats.kendalltau(est, tru).statistic)


def _keyed(scores: Mapping) -> dict[Arch, float]:
    return {as_arch(k): float(v) for k, v in scores.items()}


def subset_kendall(
    estimated: Mapping[Arch | str | int, float],
    truth: Mapping[Arch | str | int, float],
    subset: Iterable[Arch | str | int],
) -> dict[str, float]:
    """Kendall-tau over ``subset`` (e.g. the 327-cell ``kendall_subset``), with arch keys given as op tuples,
    NB201 strings or table indices. Every subset cell must have both an estimate and a ground truth.
    Returns ``tau``, ``n``, and ``top1_true``: the ground truth of the cell the supernet ranks best (the
    "Top-1 Acc." of DYNAS' table, ties broken by subset order)."""
    est, tru = _keyed(estimated), _keyed(truth)
    cells = [as_arch(a) for a in subset]
    for name, table in (("estimated", est), ("truth", tru)):
        missing = [c for c in cells if c not in table]
        if missing:
            raise ConfigError(
                f"subset_kendall: {len(missing)} subset cells have no {name} score, e.g. {missing[0]}"
            )
    e = [est[c] for c in cells]
    g = [tru[c] for c in cells]
    best = int(np.argmax(e)) if cells else -1
    return {
        "tau": kendall_tau(e, g),
        "n": len(cells),
        "top1_true": g[best] if cells else math.nan,
    }


def seed_agreement(records: Sequence[dict]) -> float | None:
    """The ground truth's own ceiling: Kendall tau between the test accuracies of two stand-alone trainings of
    the same cells (``records[i]["runs"]``, one per ``groundtruth.seeds``), averaged over pairs of seeds. None
    with fewer than two runs per cell (a single run, or NAS-Bench-201's table)."""
    runs = [r.get("runs") or [] for r in records]
    k = min((len(x) for x in runs), default=0)
    if k < 2:
        return None
    taus = [kendall_tau([x[i]["test_acc"] for x in runs], [x[j]["test_acc"] for x in runs])
            for i in range(k) for j in range(i + 1, k)]  # fmt: skip
    finite = [t for t in taus if np.isfinite(t)]
    return float(np.mean(finite)) if finite else None
