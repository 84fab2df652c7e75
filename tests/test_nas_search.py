"""Tabular NAS on NAS-Bench-201: ground truth, strategies, the search stage, the table and its workflow."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from workflow_helpers import planned, planned_jobs, snakemake, write_config

from zsqpipe.cli import cli
from zsqpipe.config import validate_config
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import DATASETS, DEFAULT_PATH, benchmark_optimum, load_benchmark
from zsqpipe.nas.benchmark import test_accuracy as ground_truth_test
from zsqpipe.nas.spaces.nb201 import arch_to_index, arch_to_str, index_to_arch, str_to_arch
from zsqpipe.nas.strategies import STRATEGY_NAMES, BudgetExhausted, QueryLog, get_strategy, run_strategy
from zsqpipe.nas.strategies.ase import ASEConfig, graph_edges
from zsqpipe.stages.nas_table import run_nas_table
from zsqpipe.stages.search import run_search
from zsqpipe.tracking import Tracker

BEST_C10 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"


@pytest.fixture(autouse=True)
def one_thread():
    """The controllers are tiny: one thread is fastest (and what the rule uses)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def table():
    return pd.read_csv(DEFAULT_PATH)


@pytest.fixture(scope="module")
def shuffled_test_path(tmp_path_factory, table):
    """The benchmark with every test column permuted across cells (validation columns untouched)."""
    rng = np.random.default_rng(0)
    df = table.copy()
    for d in DATASETS:
        df[f"{d}_test"] = rng.permutation(df[f"{d}_test"].to_numpy())
    path = tmp_path_factory.mktemp("nb201") / "shuffled.csv.gz"
    with gzip.open(path, "wt") as f:
        df.to_csv(f, index=False)
    return path


# ---------------------------------------------------------------------------------------------------------
# Ground truth


def test_arch_string_index_round_trip_over_the_table(table):
    assert len(table) == 15625
    for index, s in zip(table["index"], table["arch"], strict=True):
        arch = str_to_arch(s)
        assert arch_to_index(arch) == index
        assert arch_to_str(index_to_arch(index)) == s


def test_benchmark_valid_only_and_reporting_functions(table):
    bench = load_benchmark()
    assert set(bench.datasets) == set(DATASETS)
    assert not any("test" in name for name in vars(bench))  # no test column reaches the search side
    row = table[table["arch"] == BEST_C10].iloc[0]
    assert bench.query_valid(BEST_C10, "cifar10") == row["cifar10_valid"]
    assert bench.evaluator("cifar100")(str_to_arch(BEST_C10)) == row["cifar100_valid"]
    assert ground_truth_test(BEST_C10, "imagenet16") == row["imagenet16_test"]
    optima = {d: benchmark_optimum(d)["best_test_acc"] for d in DATASETS}
    assert optima == {"cifar10": 94.37, "cifar100": 73.51, "imagenet16": 47.31}
    with pytest.raises(ConfigError, match="imagenet"):
        bench.query_valid(BEST_C10, "imagenet")


def test_table_without_test_columns_still_searches(tmp_path, table):
    path = tmp_path / "valid_only.csv"
    table.drop(columns=[f"{d}_test" for d in DATASETS]).to_csv(path, index=False)
    r = run_strategy("rea", load_benchmark(path).evaluator("cifar10"), 30, 0)
    assert len(r.history) == 30
    with pytest.raises(IntegrityError, match="cifar10_test"):
        ground_truth_test(r.best_arch, "cifar10", path)


def test_corrupt_table_is_one_line_error(tmp_path):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(DEFAULT_PATH.read_bytes()[:5000])
    with pytest.raises(IntegrityError) as e:
        load_benchmark(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Strategies


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_budget_respected_and_deterministic(strategy):
    ev = load_benchmark().evaluator("cifar10")
    a = run_strategy(strategy, ev, 25, seed=3)
    b = run_strategy(strategy, ev, 25, seed=3)
    c = run_strategy(strategy, ev, 25, seed=4)
    assert len(a.history) == 25 and [q.query for q in a.history] == list(range(1, 26))
    assert a.history == b.history and a.best_arch == b.best_arch and a.extras == b.extras
    assert [q.arch for q in a.history] != [q.arch for q in c.history]
    assert a.best_valid == max(q.valid_acc for q in a.history)  # ASE's best node is the best query too
    assert a.best_so_far() == list(np.maximum.accumulate([q.valid_acc for q in a.history]))


def test_query_log_refuses_past_budget():
    log = QueryLog(lambda arch: 1.0, 2)
    log(index_to_arch(0))
    log(index_to_arch(1))
    with pytest.raises(BudgetExhausted):
        log(index_to_arch(2))


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_search_never_reads_test_columns(strategy, shuffled_test_path, tmp_path):
    """Permuting the test columns changes the reported test accuracy, never the search (every seed)."""
    params = {"init_archs": [BEST_C10]} if strategy == "ase_plus" else {}
    ra = run_search("cifar10", strategy, [1, 2], 40, params, tmp_path / "a.json")
    rb = run_search("cifar10", strategy, [1, 2], 40, params, tmp_path / "b.json",
                    benchmark_path=shuffled_test_path)  # fmt: skip
    assert ra["seeds"] == rb["seeds"] == [1, 2] and len(ra["records"]) == 2
    for a, b in zip(ra["records"], rb["records"], strict=True):
        for key in ("seed", "arch", "valid_acc", "history", "best_valid_so_far", "queries"):
            assert a[key] == b[key], key
        assert a["test_acc"] == ground_truth_test(a["arch"], "cifar10")
        assert b["test_acc"] == ground_truth_test(a["arch"], "cifar10", shuffled_test_path)


def test_seeds_in_one_job_equal_separate_jobs(tmp_path):
    """Grouping seeds into one process changes nothing: each record is what a one-seed run writes."""
    both = run_search("cifar100", "reinforce", [3, 1], 25, {}, tmp_path / "both.json")
    one = run_search("cifar100", "reinforce", 1, 25, {}, tmp_path / "one.json")
    assert [r["seed"] for r in both["records"]] == [3, 1] and one["seeds"] == [1]
    a, b = both["records"][1], one["records"][0]
    assert {k: v for k, v in a.items() if k != "wall_time_s"} == {
        k: v for k, v in b.items() if k != "wall_time_s"
    }
    assert json.loads((tmp_path / "both.json").read_text()) == json.loads(json.dumps(both))
    with pytest.raises(ConfigError, match="duplicate seed"):
        run_search("cifar100", "random", [1, 1], 25, {}, tmp_path / "x.json")


def test_ase_beats_random_on_cifar10():
    """Budget 100, 5 seeds (measured: ASE 94.23 vs random 93.72 mean test accuracy)."""
    ev = load_benchmark().evaluator("cifar10")
    means = {}
    for strategy in ("random", "ase"):
        results = [run_strategy(strategy, ev, 100, seed) for seed in range(5)]
        means[strategy] = (np.mean([ground_truth_test(r.best_arch, "cifar10") for r in results]),
                           np.mean([r.best_valid for r in results]))  # fmt: skip
    assert means["ase"][0] > means["random"][0] and means["ase"][1] > means["random"][1], means


def test_ase_graph_edges_worse_to_better():
    assert graph_edges([3.0, 1.0, 2.0]) == [(1, 0), (1, 2), (2, 0)]
    assert graph_edges([1.0, 1.0]) == [(0, 1)]  # one edge per pair on ties


def test_ase_inplace_mutation_option():
    ev = load_benchmark().evaluator("cifar100")
    fixed = run_strategy("ase", ev, 60, 0)
    official = run_strategy("ase", ev, 60, 0, {"inplace_mutation": True})
    assert "node_cursors" in official.extras and "node_cursors" not in fixed.extras
    assert [q.arch for q in fixed.history] != [q.arch for q in official.history]
    for r in (fixed, official):  # node accuracies are those of the node archs (the reported output)
        for arch, acc in zip(r.extras["nodes"], r.extras["node_valid_accs"], strict=True):
            assert ev(str_to_arch(arch)) == acc


def test_ase_plus_seeds_initial_nodes(tmp_path):
    ev = load_benchmark().evaluator("cifar10")
    r = run_strategy("ase_plus", ev, 20, 0, {"init_archs": [BEST_C10]})
    assert arch_to_str(r.history[0].arch) == BEST_C10 and r.extras["init_archs"][0] == BEST_C10
    assert r.best_valid >= ev(str_to_arch(BEST_C10))  # at least as good as its seed
    with pytest.raises(ConfigError, match="init_archs"):
        run_strategy("ase_plus", ev, 20, 0, {"init_archs": [BEST_C10] * 4})
    # from a previous result file: the final nodes of the record of the same seed
    prev = run_search("cifar10", "ase", [0, 1], 30, {}, tmp_path / "c10.json")["records"]
    assert prev[0]["nodes"] != prev[1]["nodes"]
    recs = run_search(
        "cifar100", "ase_plus", [1, 0], 30, {}, tmp_path / "c100.json", init_from=tmp_path / "c10.json"
    )["records"]
    assert recs[0]["init_archs"] == prev[1]["nodes"] and recs[1]["init_archs"] == prev[0]["nodes"]
    assert all(r["queries"] == 30 for r in recs)
    with pytest.raises(ConfigError, match="ase_plus"):
        run_search("cifar100", "rea", 0, 30, {}, tmp_path / "x.json", init_from=tmp_path / "c10.json")
    with pytest.raises(IntegrityError, match="no search result for seed 5") as e:
        run_search(
            "cifar100", "ase_plus", [0, 5], 30, {}, tmp_path / "x.json", init_from=tmp_path / "c10.json"
        )
    assert "\n" not in str(e.value) and not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Configuration errors are one line


@pytest.mark.parametrize(
    "nas, match",
    [
        ({"strategies": ["bogus"]}, "nas.strategies.0"),
        ({"datasets": ["imagenet"]}, "nas.datasets.0"),
        ({"budget": 0}, "nas.budget"),
        ({"params": {"rea": {"pop": 3}}}, "nas.params.rea.pop"),
        ({"params": {"ase": {"lr": 0}}}, "nas.params.ase.lr"),
        ({"params": {"ase_plus": {"init_archs": ["|none~0|"]}}}, "nas.params.ase_plus.init_archs.0"),
        ({"params": {"ase_plus": {"init_from": {"dataset": "cifar10"}}}}, "init_from"),
        ({"params": {"ase_plus": {"init_from_by_dataset": {"svhn": {"dataset": "cifar10", "strategy": "ase"}}}}},
         "init_from_by_dataset"),  # fmt: skip
    ],
)
def test_config_errors_are_one_line(nas, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate_config({"nas": nas})
    assert "\n" not in str(e.value)


def test_strategy_and_stage_errors_are_one_line(tmp_path):
    ev = load_benchmark().evaluator("cifar10")
    for call, match in [
        (lambda: run_strategy("rea", ev, 10, 0, {"pop": 3}), "nas.params.rea.pop: unknown key"),
        (lambda: run_strategy("ase", ev, 10, 0, {"lr": "fast"}), "nas.params.ase.lr"),
        (lambda: run_strategy("ase", ev, 2, 0), "nas.budget"),
        (lambda: run_strategy("bogus", ev, 10, 0), "bogus"),
        (lambda: run_search("svhn", "ase", 0, 10, {}, tmp_path / "x.json"), "svhn"),
        (lambda: run_strategy("ase_plus", ev, 10, 0, {"init_archs": ["nope"]}), "nope"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_cli_search_and_table(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    r = runner.invoke(cli, ["search", "--dataset", "cifar10", "--strategy", "rea", "--seed", "2", "--budget", "30",
                            "--params", '{"population": 5}', "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    content = json.loads(out.read_text())
    assert content["seeds"] == [2] and len(content["records"]) == 1
    rec = content["records"][0]
    assert (
        rec["seed"] == 2
        and rec["queries"] == 30
        and rec["params"] == {"population": 5}
        and len(rec["best_valid_so_far"]) == 30
    )
    assert rec["test_acc"] == ground_truth_test(rec["arch"], "cifar10") and rec["index"] == arch_to_index(
        str_to_arch(rec["arch"])
    )
    bad = runner.invoke(cli, ["search", "--dataset", "cifar10", "--strategy", "rea", "--params", '{"x": 1}',
                              "--out", str(tmp_path / "bad.json")])  # fmt: skip
    assert bad.exit_code == 1 and "nas.params.rea.x: unknown key" in bad.output
    assert not (tmp_path / "bad.json").exists()
    many = tmp_path / "many.json"
    for args in (["--seeds", "0,1,3"], ["--seed", "0", "--seed", "1", "--seeds", "3"]):
        r = runner.invoke(cli, ["search", "--dataset", "cifar10", "--strategy", "random", "--budget", "10",
                                "--out", str(many), *args])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert json.loads(many.read_text())["seeds"] == [0, 1, 3]
    bad = runner.invoke(cli, ["search", "--dataset", "cifar10", "--strategy", "random", "--seeds", "0,x",
                              "--out", str(tmp_path / "bad.json")])  # fmt: skip
    assert bad.exit_code == 1 and "--seeds" in bad.output
    t = runner.invoke(cli, ["nas-table", str(out), "--out-csv", str(tmp_path / "t.csv"), "--out-md",
                            str(tmp_path / "t.md")])  # fmt: skip
    assert t.exit_code == 0, t.output


class RecordingTracker(Tracker):
    def __init__(self):
        super().__init__({"enabled": False})
        self.calls = []

    def log_params(self, params):
        self.calls.append(("params", params))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("metrics", metrics, step))

    def log_artifact(self, path, artifact_path=None):
        self.calls.append(("artifact", str(path)))


def test_search_logs_to_tracker(tmp_path):
    """One run per job: params once, per-seed metrics at step = the seed's position, the JSON as artifact."""
    tracker = RecordingTracker()
    out = run_search("imagenet16", "random", [4, 7], 10, {}, tmp_path / "r.json", job=Job(tracker=tracker))
    params = [c[1] for c in tracker.calls if c[0] == "params"]
    assert len(params) == 1 and params[0]["strategy"] == "random" and params[0]["budget"] == 10
    assert params[0]["seeds"] == [4, 7]
    per_seed = [c for c in tracker.calls if c[0] == "metrics" and c[2] is not None]
    assert [(m["seed"], step) for _, m, step in per_seed] == [(4, 0), (7, 1)]
    for (_, m, _), rec in zip(per_seed, out["records"], strict=True):
        assert m["test_acc"] == rec["test_acc"] and m["queries"] == 10
    assert [c[1] for c in tracker.calls if c[0] == "artifact"] == [str(tmp_path / "r.json")]


def test_nas_table_rows(tmp_path):
    paths = []
    for strategy in ("random", "rea"):
        paths.append(tmp_path / f"{strategy}.json")
        run_search("cifar100", strategy, [0, 1], 20, {}, paths[-1])
    paper = {"rea": {"cifar100": {"mean": 73.0, "std": 0.5}}}
    t = run_nas_table(paths, tmp_path / "nas.csv", tmp_path / "nas.md", "t", paper)
    assert list(t["strategy"]) == ["random", "rea"] and (t["n_seeds"] == 2).all()
    assert list(t["paper"]) == ["", "73.00 ± 0.50"] and (t["optimum_test"] == 73.51).all()
    assert (t["queries"] == 20).all() and t["test_acc_std"].notna().all()
    assert "73.00 ± 0.50" in (tmp_path / "nas.md").read_text()
    assert list(t["seeds"]) == ["0 1", "0 1"]
    with pytest.raises(IntegrityError, match="duplicate"):
        run_nas_table(paths + paths[:1], tmp_path / "x.csv", tmp_path / "x.md")
    (tmp_path / "empty.json").write_text('{"records": []}')
    with pytest.raises(IntegrityError, match="without 'records'"):
        run_nas_table([tmp_path / "empty.json"], tmp_path / "x.csv", tmp_path / "x.md")


def test_every_strategy_is_registered():
    for name in STRATEGY_NAMES:
        assert get_strategy(name).name == name


# ---------------------------------------------------------------------------------------------------------
# Workflow


def test_workflow_builds_nas_table(tmp_path):
    """config/smoke.yaml's nas section (cifar10; random and ase; 2 seeds; 20 queries) through snakemake:
    one search job per strategy (both seeds in it).

    MLflow off: the search jobs would spend most of their time importing mlflow (test_workflow.py covers the
    tracked runs; test_search_logs_to_tracker what this stage logs)."""
    cfg = write_config(tmp_path / "smoke.yaml", tracking=False)
    snakemake(tmp_path, cfg, "--cores", "2", "results/tables/nas.csv")
    t = pd.read_csv(tmp_path / "results/tables/nas.csv")
    assert (
        list(t["strategy"]) == ["random", "ase"] and (t["n_seeds"] == 2).all() and (t["queries"] == 20).all()
    )
    assert list(t["paper"].fillna("")) == ["", "94.23 ± 0.22"]
    content = json.loads((tmp_path / "results/nas/nb201/cifar10/ase.json").read_text())
    assert content["seeds"] == [0, 1] and [r["seed"] for r in content["records"]] == [0, 1]
    # ASE's draws depend on torch's thread count: fixed by the rule and recorded with the versions
    assert content["runtime"]["threads"] == 1 and content["runtime"]["torch"] and content["runtime"]["cpu_capability"]
    rec = content["records"][1]
    assert rec["params"]["lr"] == ASEConfig().lr and len(rec["history"]) == 20
    assert (tmp_path / "results/logs/search/nb201/cifar10/ase.log").is_file()
    assert (tmp_path / "results/benchmarks/search/nb201/cifar10/ase.tsv").is_file()
    # a strategy setting reaches its rule: only that strategy's search job and the table rerun
    cfg2 = write_config(tmp_path / "lr.yaml", tracking=False, nas__params={"ase": {"lr": 0.01}})
    jobs = planned_jobs(tmp_path, cfg2, "results/tables/nas.csv")
    assert sorted(j[0] for j in jobs) == ["nas_table", "search"]
    assert all("strategy=ase" in w for r, w in jobs if r == "search")
    # the seeds are a param too: another seed list reruns every search job
    cfg3 = write_config(tmp_path / "seeds.yaml", tracking=False, nas__seeds=[0, 1, 2])
    jobs = planned_jobs(tmp_path, cfg3, "results/tables/nas.csv")
    assert sorted(j[0] for j in jobs) == ["nas_table", "search", "search"]


def test_ase_plus_official_chain_and_self_seeding(tmp_path):
    """init_from_by_dataset: the official chain CIFAR-10 ase -> CIFAR-100 ase_plus -> ImageNet16-120 ase_plus;
    a chain that returns to its own dataset is a one-line error."""
    chain = {"imagenet16": {"dataset": "cifar100", "strategy": "ase_plus"}}
    cfg = write_config(tmp_path / "chain.yaml", tracking=False, nas__datasets=["cifar10", "cifar100", "imagenet16"],
                       nas__strategies=["ase", "ase_plus"], nas__params={"ase_plus": {"init_from_by_dataset": chain}})  # fmt: skip
    jobs = planned(tmp_path, cfg, "results/tables/nas.csv")
    shells = {w: job["shell"] for (rule, w), job in jobs.items() if rule == "search" and "strategy=ase_plus" in w}
    by_dataset = {d: next(sh for w, sh in shells.items() if f"dataset={d}" in w) for d in ("cifar10", "cifar100", "imagenet16")}
    assert "--init-from results/nas/nb201/cifar10/ase.json" in by_dataset["cifar10"]  # init_from (default)
    assert "--init-from results/nas/nb201/cifar10/ase.json" in by_dataset["cifar100"]
    assert "--init-from results/nas/nb201/cifar100/ase_plus.json" in by_dataset["imagenet16"]
    loop = {"cifar100": {"dataset": "imagenet16", "strategy": "ase_plus"},
            "imagenet16": {"dataset": "cifar100", "strategy": "ase_plus"}}  # fmt: skip
    cfg2 = write_config(tmp_path / "loop.yaml", tracking=False, nas__datasets=["cifar100", "imagenet16"],
                        nas__strategies=["ase_plus"], nas__params={"ase_plus": {"init_from_by_dataset": loop}})  # fmt: skip
    r = snakemake(tmp_path, cfg2, "-n", "results/tables/nas.csv", check=False)
    assert r.returncode != 0 and "nas.params.ase_plus.init_from': ase_plus on" in r.stdout + r.stderr
