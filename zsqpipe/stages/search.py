"""Stage ``search``: one NAS run on a tabular benchmark (NAS-Bench-201), written as one JSON file.

The strategy sees only a budgeted evaluator returning **validation** accuracy
(:meth:`zsqpipe.nas.benchmark.TabularBenchmark.evaluator`); the found cell's ground-truth **test** accuracy is
looked up after the search has returned, by the separate reporting function
:func:`zsqpipe.nas.benchmark.test_accuracy`.
"""

from __future__ import annotations

import time
from pathlib import Path

from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import read_json, sha256_file, write_json
from zsqpipe.nas.benchmark import DATASETS, load_benchmark, test_accuracy
from zsqpipe.nas.spaces.nb201 import arch_to_index, arch_to_str, str_to_arch
from zsqpipe.nas.strategies import STRATEGY_NAMES, run_strategy
from zsqpipe.tracking import Tracker

SPACES = ("nb201",)


def init_archs_from(path: Path) -> list[str]:
    """Seed architectures from a previous ``search`` result: its final graph nodes (ASE), else its best cell."""
    prev = read_json(path)
    archs = prev.get("nodes") or ([prev["arch"]] if "arch" in prev else [])
    if not archs:
        raise IntegrityError(f"{path}: search result without 'nodes' or 'arch'")
    for a in archs:
        str_to_arch(a)  # one-line error on a malformed string
    return list(archs)


def run_search(
    dataset: str,
    strategy: str,
    seed: int,
    budget: int,
    params: dict,
    out: Path,
    space: str = "nb201",
    init_from: Path | None = None,
    benchmark_path: Path | None = None,
    threads: int | None = None,
    tracker: Tracker | None = None,
    log=print,
) -> dict:
    tracker = tracker or Tracker()
    if space not in SPACES:
        raise ConfigError(f"nas.space: {space!r} is not one of {list(SPACES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"nas.datasets: {dataset!r} is not one of {list(DATASETS)}")
    if strategy not in STRATEGY_NAMES:
        raise ConfigError(f"nas.strategies: {strategy!r} is not one of {list(STRATEGY_NAMES)}")
    params = dict(params or {})
    if init_from is not None:
        if strategy != "ase_plus":
            raise ConfigError(
                f"--init-from: only strategy 'ase_plus' takes seed architectures, not {strategy!r}"
            )
        params["init_archs"] = list(params.get("init_archs", [])) + init_archs_from(init_from)
    if threads and strategy in ("reinforce", "ase", "ase_plus"):
        import torch

        torch.set_num_threads(int(threads))  # tiny tensors: extra threads only add overhead

    bench = load_benchmark(benchmark_path)
    tracker.log_params({"space": space, "dataset": dataset, "strategy": strategy, "seed": seed,
                        "budget": budget, "params": params})  # fmt: skip
    t0 = time.perf_counter()
    result = run_strategy(strategy, bench.evaluator(dataset), budget, seed, params, log)
    seconds = time.perf_counter() - t0
    # reporting only, after the search returned: the strategy never had access to these
    test = test_accuracy(result.best_arch, dataset, benchmark_path)

    record = {
        "space": space,
        "dataset": dataset,
        "strategy": strategy,
        "seed": seed,
        "budget": budget,
        "params": params,
        "queries": len(result.history),
        "arch": arch_to_str(result.best_arch),
        "index": arch_to_index(result.best_arch),
        "valid_acc": result.best_valid,
        "test_acc": test,
        "best_valid_so_far": result.best_so_far(),
        "history": [[arch_to_index(q.arch), q.valid_acc] for q in result.history],
        "wall_time_s": seconds,
        "benchmark_sha256": sha256_file(bench.source),
        **result.extras,
    }
    write_json(out, record)
    tracker.log_metrics({"valid_acc": result.best_valid, "test_acc": test, "queries": len(result.history),
                         "wall_time_s": seconds})  # fmt: skip
    tracker.log_artifact(out)
    log(f"{strategy} on {dataset} (seed {seed}, {len(result.history)} queries, {seconds:.1f}s): "
        f"{record['arch']} valid {result.best_valid:.2f} test {test:.2f}")  # fmt: skip
    return record
