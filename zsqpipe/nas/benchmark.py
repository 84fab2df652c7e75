"""NAS-Bench-201 as a tabular benchmark: 200-epoch accuracies of all 15,625 cells (shipped, ``data/``).

Two doors, on purpose:

- :func:`load_benchmark` returns a :class:`TabularBenchmark` that holds the **validation** accuracies only
  (the test columns are not even read). Searches get nothing else: ``query_valid(arch, dataset)`` or the
  evaluator callable from ``evaluator(dataset)``.
- :func:`test_accuracy` and :func:`benchmark_optimum` read the **test** columns, for reporting after a
  search has finished. Search code never receives them.

Datasets: ``cifar10`` (the "cifar10-valid" split: train 25k / valid 25k; test = the CIFAR-10 test set after
training on all 50k), ``cifar100``, ``imagenet16`` (ImageNet16-120). See ``data/README.md`` for the file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from zsqpipe.errors import ConfigError, DataError, IntegrityError
from zsqpipe.nas.spaces.nb201 import (
    NUM_ARCHS,
    Arch,
    arch_to_index,
    arch_to_str,
    index_to_arch,
    is_connected,
    str_to_arch,
)

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet16")
# zsqpipe datasets (zsqpipe.data) whose NB201 ground truth is in the table: their table column prefix
TABLE_OF_DATASET: dict[str, str] = {"cifar10": "cifar10", "cifar100": "cifar100"}
DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "nasbench201.csv.gz"


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ConfigError(f"NAS-Bench-201 dataset {dataset!r}: expected one of {list(DATASETS)}")
    return dataset


def _as_arch(arch: Arch | str) -> Arch:
    return str_to_arch(arch) if isinstance(arch, str) else tuple(arch)


def _read_columns(path: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The given columns as arrays in ``index`` order (0..15624), after checking the table's integrity."""
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: NAS-Bench-201 ground-truth table not found") from None
    return _read_columns_cached(path, st.st_mtime_ns, st.st_size, columns)


@functools.cache
def _read_columns_cached(
    path: str, _mtime: int, _size: int, columns: tuple[str, ...]
) -> dict[str, np.ndarray]:
    import pandas as pd

    try:
        df = pd.read_csv(path, usecols=["index", "arch", *columns])
    except ValueError as e:  # missing columns
        raise IntegrityError(f"{path}: not a NAS-Bench-201 table ({e})") from None
    except Exception as e:  # truncated gzip, bad CSV
        raise IntegrityError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(df) != NUM_ARCHS or sorted(df["index"]) != list(range(NUM_ARCHS)):
        raise IntegrityError(f"{path}: expected one row per index 0..{NUM_ARCHS - 1}, got {len(df)} rows")
    df = df.sort_values("index")
    expected = [arch_to_str(index_to_arch(i)) for i in range(NUM_ARCHS)]
    bad = np.flatnonzero(df["arch"].to_numpy() != np.array(expected, dtype=object))
    if len(bad):
        raise IntegrityError(f"{path}: row index {int(bad[0])} has arch {df['arch'].iloc[bad[0]]!r}")
    out = {}
    for c in columns:
        values = df[c].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise IntegrityError(f"{path}: column {c!r} has missing values")
        values.flags.writeable = False
        out[c] = values
    return out


def _path(path: str | os.PathLike | None) -> str:
    return str(Path(path).resolve()) if path else str(DEFAULT_PATH)


class TabularBenchmark:
    """Validation accuracies (%) of every NB201 cell; what a search may query. Holds no test accuracy."""

    def __init__(self, valid: dict[str, np.ndarray], source: str):
        self._valid = dict(valid)
        self.source = source

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(self._valid)

    def query_valid(self, arch: Arch | str, dataset: str) -> float:
        """200-epoch validation accuracy (%) of ``arch`` (op tuple or NB201 string) on ``dataset``."""
        return float(self._valid[_check_dataset(dataset)][arch_to_index(_as_arch(arch))])

    def evaluator(self, dataset: str) -> Callable[[Arch], float]:
        """``arch -> validation accuracy`` on one dataset: the only thing a search strategy receives."""
        table = self._valid[_check_dataset(dataset)]

        def evaluate(arch: Arch) -> float:
            return float(table[arch_to_index(arch)])

        return evaluate


def load_benchmark(path: str | os.PathLike | None = None) -> TabularBenchmark:
    """The search-side benchmark: validation columns only (``path``: another table, e.g. in tests)."""
    p = _path(path)
    cols = _read_columns(p, tuple(f"{d}_valid" for d in DATASETS))
    return TabularBenchmark({d: cols[f"{d}_valid"] for d in DATASETS}, p)


# ---------------------------------------------------------------------------------------------------------
# Reporting only (after a search): test accuracies. Never pass these to a strategy.


def test_accuracy(arch: Arch | str, dataset: str, path: str | os.PathLike | None = None) -> float:
    """Ground-truth 200-epoch **test** accuracy (%) of ``arch`` on ``dataset``: for reporting only."""
    column = f"{_check_dataset(dataset)}_test"
    return float(_read_columns(_path(path), (column,))[column][arch_to_index(_as_arch(arch))])


def benchmark_optimum(dataset: str, path: str | os.PathLike | None = None) -> dict:
    """The best cells of the table: by test accuracy (the benchmark optimum) and by validation accuracy
    (what a perfect validation-based search finds), with their test accuracies."""
    d = _check_dataset(dataset)
    cols = _read_columns(_path(path), (f"{d}_valid", f"{d}_test"))
    valid, test = cols[f"{d}_valid"], cols[f"{d}_test"]
    i_test, i_valid = int(np.argmax(test)), int(np.argmax(valid))
    return {
        "dataset": d,
        "best_test_arch": arch_to_str(index_to_arch(i_test)),
        "best_test_acc": float(test[i_test]),
        "best_valid_arch": arch_to_str(index_to_arch(i_valid)),
        "best_valid_acc": float(valid[i_valid]),
        "best_valid_test_acc": float(test[i_valid]),
    }


# ---------------------------------------------------------------------------------------------------------
# Supernet ranking (Kendall-tau): the conventional cell subset and its ground truth


def kendall_subset(path: str | os.PathLike | None = None) -> list[int]:
    """Table indices of the 327 cells on which supernet ranking is conventionally measured (the
    ``kendall_subset`` column; DYNAS' ``kendal_320_idx.pkl``), in index order."""
    col = _read_columns(_path(path), ("kendall_subset",))["kendall_subset"]
    return [int(i) for i in np.flatnonzero(col == 1)]


SAMPLE_KEYS = ("num_archs", "sample_seed", "exclude_disconnected")  # config keys of kendall_sample


def kendall_sample(
    num_archs: int | None,
    seed: int,
    exclude_disconnected: bool = True,
    path: str | os.PathLike | None = None,
) -> list[int]:
    """A fixed sample of the Kendall subset: ``num_archs`` cells drawn without replacement by
    ``numpy.random.default_rng(seed)`` (in drawn order), or every cell in index order when ``num_archs`` is
    None. ``exclude_disconnected`` first drops cells whose output is not connected to their input (their
    networks are constant: 1 of the 327 cells, the all-``none`` one)."""
    cells = kendall_subset(path)
    if exclude_disconnected:
        cells = [i for i in cells if is_connected(index_to_arch(i))]
    if num_archs is None:
        return cells
    if not (isinstance(num_archs, int) and 2 <= num_archs <= len(cells)):
        raise ConfigError(
            f"supernet.groundtruth.num_archs: expected null or an integer in 2..{len(cells)} "
            f"(cells of the Kendall subset), got {num_archs!r}"
        )
    rng = np.random.default_rng(seed)
    return [int(cells[i]) for i in rng.choice(len(cells), size=num_archs, replace=False)]


def table_ground_truth(archs: list[Arch | str | int], path: str | os.PathLike | None = None) -> list[dict]:
    """Every NB201 dataset's 200-epoch validation and test accuracy (%) of each cell, for ranking
    evaluation (reporting side, like :func:`test_accuracy`): ``[{"cifar10_valid": .., "cifar10_test": ..,
    ...}]`` in the order of ``archs``."""
    names = tuple(f"{d}_{s}" for d in DATASETS for s in ("valid", "test"))
    cols = _read_columns(_path(path), names)
    idx = [
        int(a) if isinstance(a, int | np.integer) else arch_to_index(_as_arch(a))  # type: ignore[arg-type]
        for a in archs
    ]
    return [{n: float(cols[n][i]) for n in names} for i in idx]
