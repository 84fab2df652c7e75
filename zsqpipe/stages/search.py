"""Stage ``search``: NAS runs on a tabular benchmark (NAS-Bench-201), one per seed, written as one JSON file.

One job searches one space x dataset x strategy for every configured seed in one process (the searches take
0-2 s each; a process per seed would spend most of its time importing torch). The file holds the ``seeds``
and one record per seed (``records``), in the order of ``seeds``.

The strategy sees only a budgeted evaluator returning **validation** accuracy
(:meth:`zsqpipe.nas.benchmark.TabularBenchmark.evaluator`); the found cell's ground-truth **test** accuracy is
looked up after the search has returned, by the separate reporting function
:func:`zsqpipe.nas.benchmark.test_accuracy`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import read_json, sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import DATASETS, load_benchmark, test_accuracy
from zsqpipe.nas.spaces.nb201 import arch_to_index, arch_to_str, str_to_arch
from zsqpipe.nas.strategies import STRATEGY_NAMES, run_strategy

SPACES = ("nb201",)


def seed_record(result: dict, seed: int, path: Path | str = "search result") -> dict:
    """The record of ``seed`` in a ``search`` result file's content (``records``; a single-search record of
    the older one-file-per-seed layout is accepted too)."""
    if "records" not in result:
        if result.get("seed") == seed:
            return result
        raise IntegrityError(f"{path}: no search result for seed {seed}")
    for rec in result["records"]:
        if rec.get("seed") == seed:
            return rec
    raise IntegrityError(f"{path}: no search result for seed {seed} (seeds {result.get('seeds')})")


def init_archs_from(path: Path, seed: int, prev: dict | None = None) -> list[str]:
    """Seed architectures from a previous ``search`` result file (``prev``: its content, if already read),
    its record of ``seed``: its final graph nodes (ASE), else its best cell."""
    rec = seed_record(read_json(path) if prev is None else prev, seed, path)
    archs = rec.get("nodes") or ([rec["arch"]] if "arch" in rec else [])
    if not archs:
        raise IntegrityError(f"{path}: search result of seed {seed} without 'nodes' or 'arch'")
    for a in archs:
        str_to_arch(a)  # one-line error on a malformed string
    return list(archs)


def _seeds(seeds: int | Iterable[int]) -> list[int]:
    out = [seeds] if isinstance(seeds, int) else list(seeds)
    if not out:
        raise ConfigError("nas.seeds: expected at least one seed")
    for s in out:
        if not (isinstance(s, int) and not isinstance(s, bool) and s >= 0):
            raise ConfigError(f"nas.seeds: expected integers >= 0, got {s!r}")
    if len(set(out)) != len(out):
        raise ConfigError(f"nas.seeds: duplicate seed in {out}")
    return out


TORCH_STRATEGIES = ("reinforce", "ase", "ase_plus")  # strategies whose draws go through torch ops


def _check_names(space: str, dataset: str, strategy: str) -> None:
    if space not in SPACES:
        raise ConfigError(f"nas.space: {space!r} is not one of {list(SPACES)}")
    if dataset not in DATASETS:
        raise ConfigError(f"nas.datasets: {dataset!r} is not one of {list(DATASETS)}")
    if strategy not in STRATEGY_NAMES:
        raise ConfigError(f"nas.strategies: {strategy!r} is not one of {list(STRATEGY_NAMES)}")


def _fix_torch_runtime(strategy: str, threads: int | None) -> dict | None:
    """For strategies whose draws go through torch ops: fix the thread count and return what to record."""
    if strategy not in TORCH_STRATEGIES:
        return None
    import torch

    # the controller's draws depend on torch's intra-op thread count (ASE on CIFAR-10, 20 seeds: 94.33 with 1
    # thread, 94.30 with 2; the CPU instruction set does not matter: docs/methods/nas_search.md), so it is
    # fixed (1 unless given: tiny tensors, extra threads only add overhead) and recorded with the search
    torch.set_num_threads(int(threads or 1))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def run_search(
    dataset: str,
    strategy: str,
    seeds: int | Iterable[int],
    budget: int,
    params: dict,
    out: Path,
    space: str = "nb201",
    init_from: Path | None = None,
    benchmark_path: Path | None = None,
    job: Job | None = None,
) -> dict:
    """Search ``dataset`` with ``strategy`` once per seed; write and return ``{space, dataset, strategy,
    seeds, budget, params, records: [one record per seed], ...}``. Metrics go to ``tracker`` per seed, with
    step = the seed's position in ``seeds``."""
    job = job or Job()
    tracker, log = job.tracker, job.log
    _check_names(space, dataset, strategy)
    seeds = _seeds(seeds)
    params = dict(params or {})
    if init_from is not None:
        if strategy != "ase_plus":
            raise ConfigError(
                f"--init-from: only strategy 'ase_plus' takes seed architectures, not {strategy!r}"
            )
        prev = read_json(init_from)
        init = {s: init_archs_from(init_from, s, prev) for s in seeds}  # a missing seed fails first
    runtime = _fix_torch_runtime(strategy, job.threads)

    bench = load_benchmark(benchmark_path)
    bench_sha = sha256_file(bench.source)
    tracker.log_params({"space": space, "dataset": dataset, "strategy": strategy, "seeds": seeds,
                        "budget": budget, "params": params,
                        "init_from": str(init_from) if init_from else None})  # fmt: skip
    records = []
    t_all = time.perf_counter()
    for step, seed in enumerate(seeds):
        seed_params = dict(params)
        if init_from is not None:
            seed_params["init_archs"] = list(params.get("init_archs", [])) + init[seed]
        t0 = time.perf_counter()
        result = run_strategy(strategy, bench.evaluator(dataset), budget, seed, seed_params, log)
        seconds = time.perf_counter() - t0
        # reporting only, after the search returned: the strategy never had access to these
        test = test_accuracy(result.best_arch, dataset, benchmark_path)
        record = {
            "space": space, "dataset": dataset, "strategy": strategy, "seed": seed, "budget": budget,
            "params": seed_params, "queries": len(result.history), "arch": arch_to_str(result.best_arch),
            "index": arch_to_index(result.best_arch), "valid_acc": result.best_valid, "test_acc": test,
            "best_valid_so_far": result.best_so_far(),
            "history": [[arch_to_index(q.arch), q.valid_acc] for q in result.history],
            "wall_time_s": seconds, "benchmark_sha256": bench_sha, **result.extras,
        }  # fmt: skip
        records.append(record)
        tracker.log_metrics({"seed": seed, "valid_acc": result.best_valid, "test_acc": test,
                             "queries": len(result.history), "wall_time_s": seconds}, step=step)  # fmt: skip
        log(f"{strategy} on {dataset} (seed {seed}, {len(result.history)} queries, {seconds:.1f}s): "
            f"{record['arch']} valid {result.best_valid:.2f} test {test:.2f}")  # fmt: skip
    total = time.perf_counter() - t_all
    content = {
        "space": space, "dataset": dataset, "strategy": strategy, "seeds": seeds, "budget": budget,
        "params": params, "init_from": str(init_from) if init_from else None, "benchmark_sha256": bench_sha,
        "runtime": runtime, "wall_time_s": total, "records": records,
    }  # fmt: skip
    write_json(out, content)
    tracker.log_metrics({"wall_time_s_total": total, "test_acc_mean": sum(r["test_acc"] for r in records)
                         / len(records)})  # fmt: skip
    tracker.log_artifact(out)
    return content
