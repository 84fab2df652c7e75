"""Supernet stages: groundtruth (stand-alone training in chunks / NB201 table), supernet-train, supernet-table,
their CLI, config errors and the workflow (tiny settings on the 240-image Fashion-MNIST fixture)."""

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
from zsqpipe.io import load_checkpoint, read_json
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import TABLE_OF_DATASET, kendall_sample, kendall_subset, table_ground_truth
from zsqpipe.nas.calr import SupernetConfig
from zsqpipe.nas.ranking import kendall_tau
from zsqpipe.nas.spaces.nb201 import index_to_arch, is_connected
from zsqpipe.nas.standalone import standalone_network
from zsqpipe.nas.supernet201 import NB201Supernet
from zsqpipe.stages.groundtruth import GroundTruthConfig, num_chunks, run_groundtruth
from zsqpipe.stages.groundtruth_io import load_groundtruth
from zsqpipe.stages.supernet_table import run_supernet_table
from zsqpipe.stages.supernet_train import run_supernet_train

GT = {"num_archs": 3, "exclude_disconnected": True, "chunk_size": 2, "epochs": 1, "iters": 8, "batch_size": 32,
      "augment": False, "val_images": 40, "test_images": 120, "eval_batch_size": 64, "C": 4, "N": 1}  # fmt: skip
SN = {"epochs": 2, "iters": 10, "lr": 0.1, "batch_size": 32, "augment": False, "eval_images": 32, "eval_batch_size": 16,
      "C": 4, "N": 1}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The fixture dataset's manifest and its ground truth (3 cells in 2 chunks)."""
    from conftest import hidden_debian_data, prepare_fixture_data

    tmp = tmp_path_factory.mktemp("supernet")
    with hidden_debian_data(tmp):
        manifest = prepare_fixture_data(tmp)
        cfg = GroundTruthConfig.from_dict(GT)
        chunks = [tmp / f"chunk{k}.json" for k in range(2)]
        out = [run_groundtruth("fashion_mnist", k, cfg, chunks[k], manifest, job=Job.quiet(device="cpu", threads=1))
               for k in range(2)]  # fmt: skip
        yield {"tmp": tmp, "manifest": manifest, "cfg": cfg, "chunks": chunks, "out": out}


# ---- sample ---------------------------------------------------------------------------------------------


def test_kendall_sample_is_fixed_and_connected():
    subset = kendall_subset()
    assert len(subset) == 327 and subset[0] == 0  # the all-none cell is part of it
    assert not is_connected(("none",) * 6) and is_connected(("skip_connect",) * 6)
    assert is_connected(("skip_connect", "none", "none", "none", "skip_connect", "none"))  # 0 -> 1 -> 3
    assert not is_connected(
        ("skip_connect", "none", "none", "none", "none", "skip_connect")
    )  # 2 is unreachable
    assert is_connected(("none", "none", "none", "avg_pool_3x3", "none", "none"))
    a = kendall_sample(30, 0)
    assert a == kendall_sample(30, 0) and a != kendall_sample(30, 1) and len(set(a)) == 30
    assert set(a) <= set(subset) and all(is_connected(index_to_arch(i)) for i in a)
    assert kendall_sample(None, 0, exclude_disconnected=False) == subset
    assert len(kendall_sample(None, 0)) == 326  # only the all-none cell is cut off
    with pytest.raises(ConfigError, match="supernet.groundtruth.num_archs") as e:
        kendall_sample(327, 0)
    assert "\n" not in str(e.value)


# ---- groundtruth ----------------------------------------------------------------------------------------


def test_groundtruth_trains_the_sample_in_chunks(tiny):
    cells = kendall_sample(3, 0)
    first, second = tiny["out"]
    assert [r["index"] for r in first["records"] + second["records"]] == cells
    assert first["positions"] == [0, 2] and second["positions"] == [2, 3] and first["n_chunks"] == 2
    assert first["source"] == "trained" and first["config"]["C"] == 4
    for r in first["records"]:
        assert 0 <= r["test_acc"] <= 100 and 0 <= r["valid_acc"] <= 100 and len(r["runs"]) == 1
        assert r["runs"][0]["steps"] == 8
    joined = load_groundtruth(tiny["chunks"][::-1])  # any order: sample order comes back
    assert [r["index"] for r in joined["records"]] == cells and joined["source"] == "trained"
    # deterministic on CPU: chunk 1 again gives the same accuracies
    again = run_groundtruth("fashion_mnist", 1, tiny["cfg"], tiny["tmp"] / "again.json", tiny["manifest"],
                            job=Job.quiet(device="cpu", threads=1))  # fmt: skip
    assert [(r["valid_acc"], r["test_acc"]) for r in again["records"]] == [
        (r["valid_acc"], r["test_acc"]) for r in second["records"]
    ]
    # incomplete / mixed chunks and bad chunk numbers are one-line errors
    with pytest.raises(IntegrityError, match="chunks \\[0\\] given") as e:
        load_groundtruth(tiny["chunks"][:1])
    assert "\n" not in str(e.value)
    other = run_groundtruth(
        "cifar10", 0, GroundTruthConfig(num_archs=3, sample_seed=5), tiny["tmp"] / "o.json"
    )
    assert other["source"] == "nasbench201"
    with pytest.raises(IntegrityError, match="differs from"):
        load_groundtruth([tiny["chunks"][0], tiny["tmp"] / "o.json"])
    with pytest.raises(ConfigError, match="--chunk: 2 is out of range") as e:
        run_groundtruth("fashion_mnist", 2, tiny["cfg"], tiny["tmp"] / "x.json", tiny["manifest"], job=Job(device="cpu"))
    with pytest.raises(ConfigError, match="--data is required"):
        run_groundtruth("fashion_mnist", 0, tiny["cfg"], tiny["tmp"] / "x.json")
    assert not (tiny["tmp"] / "x.json").exists()


def test_standalone_network_is_the_supernet_skeleton():
    arch = index_to_arch(11663)
    net = standalone_network(arch, 4, 1, 1, 10)
    assert isinstance(net, NB201Supernet) and net.arch == arch and net.track_running_stats
    assert net.stem[1].affine and net.stem[1].track_running_stats  # NB201 stand-alone BN
    sn = NB201Supernet(4, 1, 1, 10)  # same modules; only BN gains affine parameters
    assert {n for n, _ in sn.named_parameters()} < {n for n, _ in net.named_parameters()}


def test_groundtruth_from_the_nb201_table(tmp_path):
    cfg = GroundTruthConfig(num_archs=4, sample_seed=1, chunk_size=2)
    assert num_chunks("cifar10", cfg) == 1 and num_chunks("fashion_mnist", cfg) == 2
    out = run_groundtruth("cifar100", 0, cfg, tmp_path / "gt.json")  # no data: a table look-up
    cells = kendall_sample(4, 1, False)
    truth = table_ground_truth(cells)
    assert out["source"] == "nasbench201" and out["table"] == "cifar100"
    assert [r["index"] for r in out["records"]] == cells
    assert [r["test_acc"] for r in out["records"]] == [t["cifar100_test"] for t in truth]
    assert out["records"][0]["nb201"]["imagenet16_valid"] == truth[0]["imagenet16_valid"]
    with pytest.raises(ConfigError, match="one chunk"):
        run_groundtruth("cifar100", 1, cfg, tmp_path / "x.json")


# ---- supernet-train -------------------------------------------------------------------------------------


def train(tiny, method, seed=0, gt=None, tag="a", **kw):
    cfg = SupernetConfig.from_dict({**SN, **kw, "method": method, "seed": seed})
    d = tiny["tmp"] / f"{method}-{seed}-{tag}"
    m = run_supernet_train(tiny["manifest"], gt or tiny["chunks"], cfg, d / "supernet.pt", d / "history.json",
                           d / "metrics.json", Job.quiet(device="cpu", threads=1))  # fmt: skip
    return m, d


def test_supernet_train_ranks_the_ground_truth(tiny):
    m, d = train(tiny, "spos_calr_ms")
    gt = load_groundtruth(tiny["chunks"])["records"]
    assert read_json(d / "metrics.json") == json.loads(json.dumps(m))
    assert m["n_archs"] == 3 and m["method"] == "spos_calr_ms" and m["split_edge"] in range(6)
    assert list(m["truths"]) == ["fashion_mnist"] and m["groundtruth"]["source"] == "trained"
    assert -1 <= m["tau"] <= 1 and m["eval_images"] == 32
    est = [s["supernet_valid_acc"] for s in m["subnets"]]
    best = est.index(max(est))
    assert m["top1"] == gt[best]["test_acc"] == m["subnets"][best]["gt_test_acc"]
    assert m["truths"]["fashion_mnist"]["sample_best_test"] == max(r["test_acc"] for r in gt)
    hist = read_json(d / "history.json")["history"]
    assert len(hist) == 2 and set(hist[0]["group_steps"]) == {"none", "skip_connect", "nor_conv_1x1",
                                                             "nor_conv_3x3", "avg_pool_3x3"}  # fmt: skip
    ckpt = load_checkpoint(d / "supernet.pt")
    model = NB201Supernet(4, 1, 1, 10)
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["config"]["method"] == "spos_calr_ms" and ckpt["split_edge"] == m["split_edge"]
    # same seed, same result (CPU); the baseline uses one optimizer group
    again, _ = train(tiny, "spos_calr_ms", tag="again")
    assert again["subnets"] == m["subnets"] and again["tau"] == m["tau"]
    base, d = train(tiny, "spos")
    assert list(read_json(d / "history.json")["history"][0]["group_steps"]) == ["shared"]
    # C/N must match the ground truth's skeleton
    with pytest.raises(ConfigError, match="C=4, N=1") as e:
        train(tiny, "spos", N=2)
    assert "\n" not in str(e.value)


def test_supernet_train_against_every_nb201_truth(tiny, monkeypatch):
    """A dataset with NB201 ground truth is ranked against all three NB201 datasets (DYNAS' table); the fixture
    dataset stands in for CIFAR-10 here."""
    monkeypatch.setitem(TABLE_OF_DATASET, "fashion_mnist", "cifar10")
    gt = tiny["tmp"] / "table-gt.json"
    run_groundtruth("fashion_mnist", 0, GroundTruthConfig(num_archs=4), gt, job=Job.quiet())
    m, d = train(tiny, "spos", gt=[gt], tag="table")
    assert (
        list(m["truths"]) == ["cifar10", "cifar100", "imagenet16"] and m["groundtruth"]["truth"] == "cifar10"
    )
    assert m["tau"] == m["truths"]["cifar10"]["tau"]
    t = run_supernet_table([d / "metrics.json"], gt.with_suffix(".csv"), gt.with_suffix(".md"))
    assert list(t["truth"]) == ["cifar10", "cifar100", "imagenet16"]
    assert (t["truth_source"] == "nasbench201").all() and t["paper_tau"].eq("").all()


# ---- supernet-table -------------------------------------------------------------------------------------


def fake_metrics(path, method, seed, tau, top1, subnets=()):
    m = {"dataset": "fashion_mnist", "method": method, "seed": seed, "n_archs": 30, "train_time_s": 60.0, "subnets": list(subnets),
         "wall_time_s": 90.0, "groundtruth": {"source": "trained", "truth": "fashion_mnist", "wall_time_s": 600.0},
         "truths": {"fashion_mnist": {"tau": tau, "tau_valid": tau - 0.1, "top1": top1,
                                      "sample_best_test": 90.0}}}  # fmt: skip
    path.write_text(json.dumps(m))
    return path


def test_supernet_table_rows(tmp_path):
    paths = [fake_metrics(tmp_path / f"{m}{s}.json", m, s, tau, top)
             for m, s, tau, top in [("spos_calr_ms", 0, 0.6, 89.0), ("spos", 0, 0.4, 88.0), ("spos", 1, 0.5, 87.0)]]  # fmt: skip
    paper = {"spos": {"fashion_mnist": {"tau": {"mean": 0.7, "std": 0.01}}}}
    t = run_supernet_table(paths, tmp_path / "t.csv", tmp_path / "t.md", "T", paper)
    assert list(t["method"]) == ["spos", "spos_calr_ms"] and list(t["n_seeds"]) == [2, 1]
    assert t["tau_mean"][0] == pytest.approx(0.45) and t["tau_std"][0] == pytest.approx(0.0707, abs=1e-4)
    assert t["top1_mean"][0] == pytest.approx(87.5) and pd.isna(t["tau_std"][1])
    assert list(t["paper_tau"]) == ["0.700 ± 0.010", ""] and list(t["label"]) == ["SPOS", "SPOS+CaLR+MS"]
    md = (tmp_path / "t.md").read_text()
    assert "0.450 ± 0.071" in md and "fashion_mnist (ours)" in md and "10.0 min of job time" in md
    assert pd.read_csv(tmp_path / "t.csv")["seeds"].tolist() == ["0 1", "0"]
    with pytest.raises(IntegrityError, match="duplicate"):
        run_supernet_table(paths + paths[:1], tmp_path / "x.csv", tmp_path / "x.md")


def _subnets(estimates, truth):
    return [{"arch": f"cell{i}", "supernet_valid_acc": e, "gt_test_acc": t}
            for i, (e, t) in enumerate(zip(estimates, truth, strict=True))]  # fmt: skip


def test_supernet_table_bootstrap_intervals_and_paired_difference(tmp_path, monkeypatch):
    """A variant that ranks the cells perfectly on every seed: tau 1 with the interval [1, 1]; SPOS ranks them
    with noise: its interval covers its mean, and the variant's paired difference to it is > 0 with an interval
    above 0. Variant names get their labels and the table's order."""
    monkeypatch.setattr("zsqpipe.stages.supernet_table.BOOTSTRAP", 400)
    rng = np.random.default_rng(1)
    truth = np.linspace(80, 90, 20)
    paths = []
    for seed in range(4):
        noisy = truth + rng.normal(0, 3, truth.size)
        paths.append(fake_metrics(tmp_path / f"s{seed}.json", "spos", seed, 0, 85, _subnets(noisy, truth)))
        paths.append(fake_metrics(tmp_path / f"c{seed}.json", "spos_calr", seed, 1, 85, _subnets(truth, truth)))
    t = run_supernet_table(paths, tmp_path / "t.csv", tmp_path / "t.md")
    spos, calr = t.iloc[0], t.iloc[1]
    assert list(t["method"]) == ["spos", "spos_calr"] and calr["label"] == "SPOS+CaLR"
    assert calr["tau_ci_low"] == pytest.approx(1) and calr["tau_ci_high"] == pytest.approx(1)
    taus = [kendall_tau(m["supernet_valid_acc"], m["gt_test_acc"]) for m in
            (pd.DataFrame(json.loads(p.read_text())["subnets"]) for p in paths[::2])]  # fmt: skip
    assert spos["tau_ci_low"] < np.mean(taus) < spos["tau_ci_high"] < 1 and np.isnan(spos["dtau_mean"])
    assert calr["dtau_mean"] == pytest.approx(1 - np.mean(taus)) and 0 < calr["dtau_ci_low"] < calr["dtau_ci_high"]
    md = (tmp_path / "t.md").read_text()
    assert f"[{spos['tau_ci_low']:.3f}, {spos['tau_ci_high']:.3f}]" in md and f"{calr['dtau_mean']:+.3f} [" in md
    assert t["gt_seed_tau"].isna().all() and "own ceiling" not in md  # one stand-alone run per cell
    again = run_supernet_table(paths, tmp_path / "u.csv", tmp_path / "u.md")
    pd.testing.assert_frame_equal(t, again)  # seeded: the same intervals every time


# ---- CLI and config ------------------------------------------------------------------------------------


def test_cli_help_and_one_line_errors(tiny):
    runner = CliRunner()
    for cmd in ("groundtruth", "supernet-train", "supernet-table"):
        r = runner.invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, cmd
    out = tiny["tmp"] / "cli-gt.json"
    r = runner.invoke(
        cli, ["groundtruth", "--dataset", "cifar10", "--params", '{"num_archs": 3}', "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert len(read_json(out)["records"]) == 3
    bad = [
        (["groundtruth", "--dataset", "cifar10", "--params", '{"num_arch": 3}', "--out", str(out)],
         "supernet.groundtruth.num_arch: unknown key"),
        (["groundtruth", "--dataset", "cifar10", "--params", '{"seeds": []}', "--out", str(out)],
         "supernet.groundtruth.seeds"),
        (["supernet-train", *map(str, tiny["chunks"]), "--data", str(tiny["manifest"]), "--method", "darts",
          "--out-model", "m.pt", "--out-history", "h.json", "--out-metrics", "x.json"], "supernet.train.method"),
        (["supernet-train", *map(str, tiny["chunks"]), "--data", str(tiny["manifest"]), "--method", "spos",
          "--params", '{"seed": 1}', "--out-model", "m.pt", "--out-history", "h.json", "--out-metrics", "x.json"],
         "'seed' is set by --seed"),
    ]  # fmt: skip
    for args, needle in bad:
        r = runner.invoke(cli, args)
        lines = [ln for ln in r.output.splitlines() if "error" in ln]
        assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], (needle, r.output)


@pytest.mark.parametrize(
    "supernet, key",
    [
        ({"methods": ["Fair-NAS"]}, "supernet.methods.0"),
        ({"variants": {"spos_x": {"method": "darts"}}}, "supernet.variants.spos_x.method"),
        ({"variants": {"spos_x": {"method": "spos", "epochs": 3}}}, "supernet.variants.spos_x.epochs"),
        ({"train": {"summed_lr": "linear"}}, "supernet.train.summed_lr"),
        ({"datasets": ["imagenet"]}, "supernet.datasets.0"),
        ({"train": {"C": 0}}, "supernet.train.C"),
        ({"train": {"method": "spos"}}, "supernet.train.method"),
        ({"train": {"split_edge": 6}}, "supernet.train.split_edge"),
        ({"groundtruth": {"num_archs": 1}}, "supernet.groundtruth.num_archs"),
        ({"groundtruth": {"C": 8}}, "supernet.groundtruth.C"),
        ({"paper": {"spos": {"cifar10": {"kendall": 0.7}}}}, "supernet.paper.spos.cifar10.kendall"),
    ],
)
def test_config_errors_are_one_line(supernet, key):
    with pytest.raises(ConfigError) as e:
        validate_config({"supernet": supernet})
    assert "\n" not in str(e.value) and f"'{key}'" in str(e.value)




# ---- workflow -------------------------------------------------------------------------------------------


def test_workflow_builds_supernet_table(tmp_path):
    """config/smoke.yaml's supernet section through snakemake (Fashion-MNIST; 3 cells in 2 ground-truth jobs;
    SPOS and SPOS+CaLR+MS, one seed; a few steps each), MLflow off."""
    cfg = write_config(tmp_path / "smoke.yaml", tracking=False)
    snakemake(
        tmp_path, cfg, "--cores", "2", "results/tables/supernet.csv", "results/tables/supernet_search.csv"
    )
    st = pd.read_csv(tmp_path / "results/tables/supernet_search.csv")
    searched = st[st["supernet"] != "-"]
    assert sorted(zip(searched["supernet"], searched["strategy"], strict=True)) == [
        ("spos", "random"), ("spos", "rea"), ("spos_calr_ms", "random"), ("spos_calr_ms", "rea")]  # fmt: skip
    assert (searched["queries"] == 12).all() and searched["true_test_mean"].notna().all()
    assert list(st[st["supernet"] == "-"]["n_searches"]) == [3, 3]  # random / best ground-truth cell rows
    t = pd.read_csv(tmp_path / "results/tables/supernet.csv")
    assert list(t["method"]) == ["spos", "spos_calr_ms"] and (t["n_archs"] == 3).all()
    assert (t["truth"] == "fashion_mnist").all() and (t["n_seeds"] == 1).all() and t["tau_mean"].notna().all()
    m = read_json(tmp_path / "results/nas/supernet/fashion_mnist/spos_calr_ms/seed0/metrics.json")
    assert m["config"]["C"] == 4 and m["config"]["iters"] == 10 and m["eval_images"] == 100
    gt = read_json(tmp_path / "results/nas/groundtruth/fashion_mnist/chunk1.json")
    assert gt["config"]["C"] == 4 and gt["config"]["iters"] == 8 and len(gt["records"]) == 1
    for rel in ("logs/groundtruth/fashion_mnist/chunk0.log", "benchmarks/groundtruth/fashion_mnist/chunk1.tsv",
                "logs/supernet_train/fashion_mnist/spos/seed0.log", "benchmarks/supernet_table.tsv",
                "nas/supernet/fashion_mnist/spos/seed0/supernet.pt"):  # fmt: skip
        assert (tmp_path / "results" / rel).is_file(), rel
    # a supernet setting reruns the supernets and the table, not the ground truth
    cfg2 = write_config(tmp_path / "lr.yaml", tracking=False, supernet__train__lr=0.05)
    jobs = sorted(j[0] for j in planned_jobs(tmp_path, cfg2, "results/tables/supernet.csv"))
    assert jobs == ["supernet_table", "supernet_train", "supernet_train"]
    # a search setting reruns only the searches and their table
    cfg3 = write_config(tmp_path / "s.yaml", tracking=False, supernet__search__budget=10)
    jobs = sorted({j[0] for j in planned_jobs(tmp_path, cfg3, "results/tables/supernet_search.csv")})
    assert jobs == ["supernet_search", "supernet_search_table"]


def test_supernet_train_resumed_after_a_kill_equals_an_uninterrupted_run(tiny, tmp_path):
    """supernet-train checkpoints every epoch (model, every MS group's optimizer, subnet sampler, data
    position, RNGs, which parameters hold a (zero) gradient): killed after epoch 1 of 3 and rerun, it ends
    bit-identical to an uninterrupted run."""
    from test_resume import assert_supernet_resume_exact

    cfg = SupernetConfig.from_dict({**SN, "epochs": 3, "iters": 4, "method": "spos_calr_ms"})

    def run(out, root, log=lambda _m: None):
        return run_supernet_train(tiny["manifest"], tiny["chunks"], cfg, out / "supernet.pt", out / "history.json",
                                  out / "metrics.json", Job("cpu", 1, log=log, resume_root=root))  # fmt: skip

    ref, res = assert_supernet_resume_exact(run, tmp_path)
    assert [s["supernet_valid_acc"] for s in res["subnets"]] == [
        s["supernet_valid_acc"] for s in ref["subnets"]
    ]


# ---- supernet-search ----------------------------------------------------------------------------------------


def test_supernet_search_uses_the_supernet_and_never_the_test_split(tiny, tmp_path, monkeypatch):
    """Search on a trained supernet: every query is a supernet score (cached per cell), the found cell is
    the best-scored one, the test split is read only for the report (scrambled test data leave the search
    unchanged), and the found cells are trained stand-alone with the groundtruth recipe."""
    import zsqpipe.stages.supernet_search as stage
    from zsqpipe.stages.data import load_prepared
    from zsqpipe.stages.supernet_search import (
        SupernetSearchConfig,
        run_supernet_search,
        run_supernet_search_table,
    )

    _, d = train(tiny, "spos_calr_ms", tag="search")
    cfg = SupernetSearchConfig(
        budget=6, seeds=(0, 1), bn_batches=1, batch_size=16, val_images=40, eval_batch_size=40
    )
    import zsqpipe.nas.supernet201 as supernet201

    queried = []
    real = stage.evaluate_subnets
    counting = lambda m, a, *r, **k: queried.extend(a) or real(m, a, *r, **k)  # noqa: E731
    monkeypatch.setattr(stage, "evaluate_subnets", counting)  # the report of the found cells
    monkeypatch.setattr(supernet201, "evaluate_subnets", counting)  # SupernetEvaluator: the search's scores
    a = run_supernet_search(d / "supernet.pt", tiny["manifest"], "random", cfg, tmp_path / "a.json",
                            groundtruth=tiny["cfg"], job=Job.quiet(device="cpu", threads=1))  # fmt: skip
    assert [r["queries"] for r in a["records"]] == [6, 6] and a["n_scored"] <= 12
    assert all(r["truth"]["source"] == "standalone" and r["truth"]["test_acc"] >= 0 for r in a["records"])
    assert len(queried) == a["n_scored"] + len(
        {r["arch"] for r in a["records"]}
    )  # search scores + the report

    def scrambled(path, verify=True):
        data = load_prepared(path, verify)
        data.test.labels = torch.randint(
            0, 10, data.test.labels.shape, generator=torch.Generator().manual_seed(0)
        )
        return data

    monkeypatch.setattr(stage, "load_prepared", scrambled)
    b = run_supernet_search(d / "supernet.pt", tiny["manifest"], "random", cfg, tmp_path / "b.json",
                            groundtruth=tiny["cfg"], job=Job.quiet(device="cpu", threads=1))  # fmt: skip
    key = lambda c: [(r["arch"], r["supernet_val_acc"]) for r in c["records"]]  # noqa: E731
    assert key(a) == key(b)
    assert [r["supernet_test_acc"] for r in a["records"]] != [r["supernet_test_acc"] for r in b["records"]]
    t = run_supernet_search_table(
        [tmp_path / "a.json"], tmp_path / "t.csv", tmp_path / "t.md", tiny["chunks"]
    )
    assert list(t["strategy"]) == ["random", "random cell (groundtruth sample)", "best groundtruth cell"]
    assert t["n_searches"].tolist()[0] == 2 and (tmp_path / "t.md").read_text().startswith("# NAS with")
    with pytest.raises(ConfigError, match="supernet.search.strategies"):
        run_supernet_search(d / "supernet.pt", tiny["manifest"], "ase_plus", cfg, tmp_path / "c.json",
                            groundtruth=tiny["cfg"], job=Job.quiet(device="cpu"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"supernet\.search\.seeds"):
        SupernetSearchConfig(seeds=(0, 0))



def test_workflow_runs_supernet_variants_as_named_runs(tmp_path):
    """supernet.variants: a name in supernet.methods trains its base method with the variant's settings and
    carries the name to its metrics and tables (dry run); an unknown name is one line at parse time."""
    cfg = write_config(tmp_path / "v.yaml", tracking=False, supernet__methods=["spos", "spos_lr_matched", "spos_calr"])
    jobs = planned(tmp_path, cfg, "results/tables/supernet.csv")
    shells = {w: info["shell"] for (rule, w), info in jobs.items() if rule == "supernet_train"}
    assert sorted(w.split("method=")[1].split(",")[0] for w in shells) == ["spos", "spos_calr", "spos_lr_matched"]
    matched = next(sh for w, sh in shells.items() if "spos_lr_matched" in w)
    assert "--method spos --label spos_lr_matched" in matched and '"summed_lr":"calr"' in matched
    calr = next(sh for w, sh in shells.items() if "method=spos_calr," in w or w.endswith("method=spos_calr"))
    assert '"calr":true' in calr and "--method spos " in calr
    plain = next(sh for w, sh in shells.items() if "method=spos," in w or w.endswith("method=spos"))
    assert '"summed_lr":"cosine"' in plain and '"calr":null' in plain
    bad = write_config(tmp_path / "b.yaml", tracking=False, supernet__methods=["spos", "fairnas"])
    r = snakemake(tmp_path, bad, "-n", "results/tables/supernet.csv", check=False)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "invalid config" in ln]
    assert r.returncode != 0 and len(lines) == 1 and "'fairnas'" in lines[0] and "supernet.variants" in lines[0]


def test_supernet_search_can_search_a_subset_of_the_supernets(tmp_path):
    """supernet.search.supernets: only the named supernet methods are searched (their supernets trained, the
    others not); a name outside supernet.methods is one line at parse time."""
    over = {"tracking": False, "supernet__methods": ["spos", "spos_calr", "spos_calr_ms"]}
    cfg = write_config(tmp_path / "s.yaml", supernet__search__supernets=["spos", "spos_calr_ms"], **over)
    jobs = planned(tmp_path, cfg, "results/tables/supernet_search.csv")
    searched = {w.split("method=")[1].split(",")[0] for rule, w in jobs if rule == "supernet_search"}
    trained = {w.split("method=")[1].split(",")[0] for rule, w in jobs if rule == "supernet_train"}
    assert searched == trained == {"spos", "spos_calr_ms"}
    bad = write_config(tmp_path / "b.yaml", supernet__search__supernets=["spos_ms"], **over)
    r = snakemake(tmp_path, bad, "-n", "results/tables/supernet_search.csv", check=False)
    assert r.returncode != 0
    assert "'supernet.search.supernets': 'spos_ms' is not one of supernet.methods" in r.stdout + r.stderr
