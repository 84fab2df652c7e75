"""OQAT on the NB201 space (zsqpipe/nas/oqat/, stages oqat-train / oqat-search / oqat-table, workflow/rules/
oqat.smk): bit inheritance, shared step sizes, BN recalibration, BitOPs, a search blind to test data, workflow."""

import math

import pandas as pd
import pytest
import torch
from workflow_helpers import planned_jobs, snakemake, write_config

from zsqpipe.io import load_checkpoint, read_json
from zsqpipe.job import Job
from zsqpipe.nas.oqat import (
    LARGEST,
    OQATSearchConfig,
    OQATTrainConfig,
    build_oqat_supernet,
    constrained_search,
    inherit_bits,
    init_step_sizes,
    lsq_quantizers,
    pareto_front,
    recalibrate_bn,
    step_sizes,
    subnet_bitops,
)
from zsqpipe.quant import QuantConv2d
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.oqat_search import run_oqat_search
from zsqpipe.stages.oqat_table import run_oqat_table
from zsqpipe.stages.oqat_train import run_oqat_train

TINY = OQATTrainConfig(C=4, N=1, epochs=1, iters=3, batch_size=16, init_batches=1, bn_batches=2, val_images=40,
                       eval_batch_size=40)  # fmt: skip
SEARCH = OQATSearchConfig(budgets=[0.4, 1.0], population=3, generations=1, children=2, parents=2, bn_batches=2,
                          batch_size=16, val_images=40, test_images=60, eval_batch_size=60)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(bits=4, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = OQATTrainConfig(**{**TINY.to_dict(), "bits": bits, **kw})
    model = build_oqat_supernet(cfg, 1, 10)
    init_step_sizes(model, [torch.randn(8, 1, 28, 28)])
    return model, cfg


def _edge_op(model, cell=0, edge=0, op="nor_conv_3x3"):
    """(activation quantizer, conv) of op ``op`` on edge ``edge`` of cell ``cell``: Sequential(ReLU+QuantAct,
    QuantConv2d, BN)."""
    m = model.cells[cell].edges[edge][op]
    return m[0][1].quantizer, m[1]


# ---- library ----------------------------------------------------------------------------------------------


def test_quantized_supernet_layout():
    model, _ = _net()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert (
        convs[0][0] == "stem.0" and convs[0][1].weight_quantizer.bits == 32
    )  # stem and classifier FP (OQAT)
    assert model.classifier.weight_quantizer.bits == 32
    assert all(m.weight_quantizer.bits == 4 for n, m in convs[1:])
    aq, conv = _edge_op(model)
    assert aq.bits == 4 and aq.q_n == 0 and aq.q_p == 15 and conv.weight_quantizer.q_p == 7
    assert conv.weight_quantizer.scale.shape == ()  # one weight step per layer (lsq_tensor)
    # every active quantizer was initialised with LSQ's init 2 mean|w| / sqrt(Q_P)
    wq = conv.weight_quantizer
    assert torch.allclose(wq.scale, 2 * conv.weight.abs().mean() / math.sqrt(7), rtol=1e-5)
    assert all(q._n > 0 for _, q in lsq_quantizers(model))


def test_bit_inheritance_doubles_steps_and_keeps_weights():
    parent, cfg = _net(bits=4)
    child = inherit_bits(parent, cfg, 3, "double")
    ps, cs = step_sizes(parent), step_sizes(child)
    assert ps.keys() == cs.keys() and len(ps) > 10
    for k in ps:
        torch.testing.assert_close(cs[k], 2 * ps[k])  # s_3 = 2 s_4
    psd, csd = parent.state_dict(), child.state_dict()
    for k, v in psd.items():
        if not k.endswith(".scale"):
            torch.testing.assert_close(csd[k], v)  # weights, BN statistics, counters copied
    assert child.oqat_bits == 3 and child.inherited == {"from_bits": 4, "rule": "double"}
    # the inherited 3-bit weights stay close to the 4-bit ones (clipping range ~ kept: 3 x 2s vs 7 x s)
    for cell, edge in ((0, 0), (2, 3), (4, 5)):
        _, c4 = _edge_op(parent, cell, edge)
        _, c3 = _edge_op(child, cell, edge)
        w = c4.weight.detach()
        with torch.no_grad():
            q4, q3 = c4.weight_quantizer(w), c3.weight_quantizer(w)
        rel = float((q3 - q4).norm() / w.norm())
        assert rel < 0.45, rel
        assert float((q3 - w).norm() / w.norm()) < 0.6
        assert len(q3.unique()) <= 8 and len(q4.unique()) <= 16 and not torch.equal(q3, q4)
    # 3 -> 2 doubles again; the re-init rule is LSQ's init at the new bits
    grand = inherit_bits(child, cfg, 2, "double")
    for k in ps:
        torch.testing.assert_close(step_sizes(grand)[k], 4 * ps[k])
    re = inherit_bits(parent, cfg, 3, "reinit", [torch.randn(8, 1, 28, 28)])
    _, conv = _edge_op(re)
    torch.testing.assert_close(conv.weight_quantizer.scale, 2 * conv.weight.abs().mean() / math.sqrt(3))


def test_step_sizes_are_shared_by_subnets():
    model, _ = _net()
    aq, conv = _edge_op(model)
    steps = [aq.scale, conv.weight_quantizer.scale]
    a = ("nor_conv_3x3", "skip_connect", "none", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    b = ("nor_conv_3x3", "nor_conv_1x1", "nor_conv_3x3", "none", "skip_connect", "nor_conv_3x3")
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    def grads(arch):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model.set_active_subnet(arch)(x), y).backward()
        return [s.grad.clone() for s in steps]

    ga, gb = grads(a), grads(b)
    assert all(g.abs().sum() > 0 for g in ga + gb)  # both subnets train the same step Parameters
    model.zero_grad(set_to_none=True)
    for arch in (a, b):  # gradients of two subnets accumulate in the one shared step
        torch.nn.functional.cross_entropy(model.set_active_subnet(arch)(x), y).backward()
    for s, g1, g2 in zip(steps, ga, gb, strict=True):
        torch.testing.assert_close(s.grad, g1 + g2)
    # a subnet without that op leaves its steps untouched
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model.set_active_subnet(("skip_connect",) * 6)(x), y).backward()
    assert all(s.grad is None for s in steps)


def test_bn_recalibration_uses_the_batch_statistics():
    model, _ = _net()
    arch = ("nor_conv_3x3",) * 6
    model.set_active_subnet(arch).eval()
    bn = model.cells[0].edges[0]["nor_conv_3x3"][2]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    torch.manual_seed(2)
    batches = [(torch.randn(16, 1, 28, 28) * 2 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    seen = []
    h = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    assert recalibrate_bn(model, batches, 3) == 3
    h.remove()
    assert (
        len(seen) == 3 and bn.momentum == 0.1 and not model.training
    )  # BN ran in train mode; momentum and eval mode restored
    mean = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)  # cumulative average of batch means
    var = torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)


def test_subnet_bitops_by_hand():
    model, _ = _net(bits=4)
    # node 1 = conv3x3(x0); node 3 = conv1x1(x0) + conv3x3(node 1)
    arch = ("nor_conv_3x3", "none", "none", "nor_conv_1x1", "nor_conv_3x3", "none")
    cells = sum(h * h * c * c * (9 + 9 + 1) for h, c in ((28, 4), (14, 8), (7, 16)))
    reduction = 14 * 14 * 8 * 4 * 9 + 14 * 14 * 8 * 8 * 9 + 7 * 7 * 16 * 8 * 9 + 7 * 7 * 16 * 16 * 9
    shortcut = 14 * 14 * 8 * 4 + 7 * 7 * 16 * 8  # 1x1 conv after avg-pool: 4-bit weights, FP (32-bit) input
    c = subnet_bitops(model, arch, (1, 28, 28))
    assert c["bitops"] == 4 * 4 * (cells + reduction) + 4 * 32 * shortcut
    assert c["fp_macs"] == 28 * 28 * 4 * 9 + 16 * 10  # stem conv + classifier, not in BitOPs
    assert c["macs"] == cells + reduction + shortcut + c["fp_macs"]
    assert c["oqat_mflops"] == pytest.approx((c["fp_macs"] + c["bitops"] / 64) / 1e6)
    # an edge whose node the output does not depend on costs nothing; W2A2 = a quarter of W4A4
    dead = subnet_bitops(model, ("nor_conv_3x3",) + ("none",) * 5, (1, 28, 28))
    assert dead["bitops"] == 4 * 4 * reduction + 4 * 32 * shortcut
    m2, _ = _net(bits=2)
    b4, b2 = (
        subnet_bitops(model, LARGEST, (1, 28, 28))["bitops"],
        subnet_bitops(m2, LARGEST, (1, 28, 28))["bitops"],
    )
    assert (
        b2 == (b4 - 4 * 32 * shortcut) // 4 + 2 * 32 * shortcut
    )  # weight_bits x act_bits: 16 -> 4; shortcut 128 -> 64


def test_constrained_search_respects_the_budget():
    def cost(a):
        return sum({"nor_conv_3x3": 9, "nor_conv_1x1": 1}.get(o, 0) for o in a)

    def score(a):
        return cost(a) + 0.1 * a.count("skip_connect")  # bigger is better

    cfg = OQATSearchConfig(population=6, generations=3, children=6, parents=3)
    cache = {}
    r1 = constrained_search(score, cost, 20, cfg, seed=0, cache=cache)
    assert r1["arch"] is not None and all(cost(a) <= 20 for a in r1["evaluated"])
    r2 = constrained_search(score, cost, 54, cfg, seed=1, cache=cache)
    assert r2["val_acc"] >= r1["val_acc"] and cost(r2["arch"]) <= 54  # shared cache: monotone in budget
    assert r1 == constrained_search(score, cost, 20, cfg, seed=0, cache={})  # deterministic
    assert constrained_search(score, cost, -1, cfg, max_tries=50)["arch"] is None
    assert [p[0] for p in pareto_front([("a", 1, 50), ("b", 2, 40), ("c", 3, 60), ("d", 3, 55)])] == [
        "a",
        "c",
    ]


# ---- stages -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-bit supernet and a 3-bit one inherited from it, on the 240-image fixture."""
    from conftest import hidden_debian_data, prepare_fixture_data

    tmp = tmp_path_factory.mktemp("oqat")
    with hidden_debian_data(tmp):
        manifest = prepare_fixture_data(tmp)
        out = {}
        for bits, parent in ((4, None), (3, tmp / "w4" / "supernet.pt")):
            d = tmp / f"w{bits}"
            cfg = OQATTrainConfig(**{**TINY.to_dict(), "bits": bits})
            out[bits] = run_oqat_train(manifest, cfg, d / "supernet.pt", d / "history.json", d / "metrics.json",
                                       parent, Job.quiet(device="cpu", threads=1))  # fmt: skip
        yield {"tmp": tmp, "manifest": manifest, "metrics": out}


def test_train_stage_inherits(trained):
    m4, m3 = trained["metrics"][4], trained["metrics"][3]
    assert m4["inherited_from"] is None and m3["inherited_from"]["bits"] == 4
    assert m3["inherited_from"]["rule"] == "double" and m3["inherited_from"][
        "mean_step_ratio"
    ] == pytest.approx(2)
    ck = load_checkpoint(trained["tmp"] / "w3" / "supernet.pt")
    assert ck["kind"] == "oqat_supernet" and ck["bits"] == 3 and ck["inherited_from"]["bits"] == 4
    h = read_json(trained["tmp"] / "w3" / "history.json")
    assert h["bits"] == 3 and len(h["history"]) == 1


def test_search_never_reads_test_accuracy(trained, monkeypatch):
    import zsqpipe.stages.oqat_search as stage

    tmp, manifest = trained["tmp"], trained["manifest"]
    sn = tmp / "w3" / "supernet.pt"
    a = run_oqat_search(sn, manifest, SEARCH, tmp / "search_a.json", Job.quiet(device="cpu", threads=1))

    def scrambled(path, verify=True):  # other test labels and images
        data = load_prepared(path, verify)
        g = torch.Generator().manual_seed(0)
        data.test.labels = torch.randint(0, 10, data.test.labels.shape, generator=g)
        data.test.images = data.test.images.flip(-1)
        return data

    monkeypatch.setattr(stage, "load_prepared", scrambled)
    b = run_oqat_search(sn, manifest, SEARCH, tmp / "search_b.json", Job.quiet(device="cpu", threads=1))
    assert [r["arch"] for r in a["found"]] == [r["arch"] for r in b["found"]]
    assert [r["val_acc"] for r in a["found"]] == [r["val_acc"] for r in b["found"]]
    assert [r["arch"] for r in a["pareto"]] == [r["arch"] for r in b["pareto"]]
    tests = lambda m: [r["test_acc"] for r in m["found"] + m["pareto"]]  # noqa: E731
    assert tests(a) != tests(b)  # the test split was read, but only for the report
    for r in a["found"]:
        assert r["bitops"] <= r["budget_bitops"] and r["test_acc"] is not None
    assert a["found"][1]["val_acc"] >= a["found"][0]["val_acc"] and a["test_images"] == 60
    # the table, Pareto CSV and plot from the search files
    t = run_oqat_table([tmp / "search_a.json"], tmp / "t.csv", tmp / "t.md", tmp / "p.csv", tmp / "p.png")
    assert list(t["budget"]) == [0.4, 1.0] and (t["bits"] == 3).all() and (t["n_seeds"] == 1).all()
    assert (tmp / "p.png").read_bytes()[:4] == b"\x89PNG" and len(pd.read_csv(tmp / "p.csv")) == len(
        a["pareto"]
    )
    md = (tmp / "t.md").read_text()
    assert "from w4 (double)" in md and "OQAT on the NB201 space" in md and "Cells: the ops on edges" in md




def test_cli_errors_are_one_line(trained):
    from click.testing import CliRunner

    from zsqpipe.cli import cli

    tmp, manifest = trained["tmp"], trained["manifest"]
    outs = [
        "--out-model",
        str(tmp / "x.pt"),
        "--out-history",
        str(tmp / "x.json"),
        "--out-metrics",
        str(tmp / "y.json"),
    ]
    parent = str(tmp / "w3" / "supernet.pt")
    cases = [
        (["--bits", "4", "--params", '{"bits": 3}'], "'bits' is set by --bits"),
        (["--bits", "4", "--params", '{"inherit_rule": "halve"}'], "oqat.train.inherit_rule"),
        (["--bits", "4", "--inherit-from", parent], "oqat.train.C: 8, but the parent"),
        (
            ["--bits", "4", "--params", '{"C": 4}', "--inherit-from", parent],
            "bit inheritance goes to fewer bits",
        ),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["oqat-train", "--data", str(manifest), *args, *outs, "--device", "cpu"])
        assert r.exit_code == 1 and msg in r.output, r.output
    assert not (tmp / "x.pt").exists()


# ---- workflow -----------------------------------------------------------------------------------------------


def test_workflow_builds_oqat_table(tmp_path):
    """config/smoke.yaml's oqat section through snakemake (4 -> 3 bits here, one seed, two budgets) on a small
    Fashion-MNIST look-alike in data.data_dir (loading the real set costs seconds per job), MLflow off."""
    from conftest import make_fashion_fixture

    root = make_fashion_fixture(tmp_path / "fmnist", n_train=400, n_test=200)
    over = {"tracking": False, "data__data_dir": str(root), "data__val_size": 100, "oqat__bits": [4, 3]}
    cfg = write_config(tmp_path / "smoke.yaml", **over)
    snakemake(tmp_path, cfg, "--cores", "2", "results/tables/oqat.csv")
    t = pd.read_csv(tmp_path / "results/tables/oqat.csv")
    assert list(t["bits"]) == [4, 4, 3, 3] and list(t["budget"]) == [0.5, 1.0] * 2
    assert t["test_top1_mean"].notna().all() and (t["n_seeds"] == 1).all()
    assert (tmp_path / "results/plots/oqat_pareto.png").is_file()
    assert (tmp_path / "results/tables/oqat_pareto.csv").is_file()
    m3 = read_json(tmp_path / "results/nas/oqat/fashion_mnist/w3/seed0/metrics.json")
    assert m3["inherited_from"]["bits"] == 4 and m3["config"]["iters"] == 3  # oqat.finetune applies
    s3 = read_json(tmp_path / "results/nas/oqat/fashion_mnist/w3/seed0/search.json")
    assert s3["val_images"] == 100 and s3["test_images"] == 200 and s3["bits"] == 3
    for rel in ("logs/oqat_train/fashion_mnist/w4/seed0.log", "benchmarks/oqat_search/fashion_mnist/w3/seed0.tsv",
                "benchmarks/oqat_table.tsv"):  # fmt: skip
        assert (tmp_path / "results" / rel).is_file(), rel
    # a fine-tuning setting reruns the inherited supernet, its search and the table, not the 4-bit one
    cfg2 = write_config(tmp_path / "ft.yaml", **over, oqat__finetune={"iters": 4})
    jobs = planned_jobs(tmp_path, cfg2, "results/tables/oqat.csv")
    assert sorted(r for r, _ in jobs) == ["oqat_search", "oqat_table", "oqat_train"]
    assert all("obits=4" not in w for _, w in jobs)


# ---- resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["nb201", "ofa_mbv3"])
def test_oqat_train_resumed_after_a_kill_equals_an_uninterrupted_run(trained, tmp_path, space):
    """oqat-train checkpoints every epoch (model, optimizer, subnet sampler, data position, RNGs): killed after
    epoch 1 of 3 and rerun, it ends bit-identical to an uninterrupted run (NB201 inherited from the fixture's
    4-bit supernet; the OFA space from LSQ init)."""
    from test_resume import assert_supernet_resume_exact

    manifest = trained["manifest"]
    if space == "nb201":
        base, parent = {**TINY.to_dict(), "bits": 3, "epochs": 3}, trained["tmp"] / "w4" / "supernet.pt"
    else:
        ofa = {"widths": [16, 24], "strides": [2, 2], "depth_list": [1, 2], "width_mult": 0.5,
               "activations": ["relu", "h_swish"], "se": [False, True]}  # fmt: skip
        base = {**TINY.to_dict(), "space": "ofa_mbv3", "ofa": ofa, "C": 8, "N": 1, "epochs": 3, "bits": 4}
        parent = None
    cfg = OQATTrainConfig.from_dict(base)

    def run(out, root, log=lambda _m: None):
        return run_oqat_train(manifest, cfg, out / "supernet.pt", out / "history.json", out / "metrics.json",
                              parent, Job("cpu", 1, log=log, resume_root=root))  # fmt: skip

    ref, res = assert_supernet_resume_exact(run, tmp_path)
    assert res["val_top1_largest"] == ref["val_top1_largest"]
