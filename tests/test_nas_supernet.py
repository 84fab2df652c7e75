"""NB201 supernet, DYNAS CaLR / momentum separation, Kendall-tau (tiny C/N, random tensors)."""

import math
import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from zsqpipe.errors import ConfigError
from zsqpipe.nas.calr import (
    LARGEST,
    SMALLEST,
    CaLR,
    GroupedSGD,
    SupernetConfig,
    as_arch,
    calr_factor,
    calr_matched_scale,
    cosine_factor,
    sample_arch,
    subnet_complexity,
)
from zsqpipe.nas.ranking import kendall_tau, seed_agreement, subset_kendall
from zsqpipe.nas.spaces.nb201 import OPS, arch_to_str
from zsqpipe.nas.supernet201 import (
    NB201Supernet,
    build_supernet,
    evaluate_subnets,
    recalibrate_bn,
    train_supernet,
)

ALL3 = ("nor_conv_3x3",) * 6
BEST = ("nor_conv_3x3", "nor_conv_3x3", "nor_conv_3x3", "skip_connect", "nor_conv_1x1", "nor_conv_3x3")


def tiny(**kw) -> NB201Supernet:
    torch.manual_seed(0)
    return NB201Supernet(C=4, N=1, in_channels=1, num_classes=10, **kw)


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---- complexity and CaLR ------------------------------------------------------------------------------


def test_complexity_matches_dynas_constants():
    assert subnet_complexity(SMALLEST) == 432 + 71680 + 640 == 72752
    assert subnet_complexity(LARGEST) == 1524272
    assert subnet_complexity(("nor_conv_1x1",) * 6) - subnet_complexity(SMALLEST) == 6 * 26880
    c = CaLR(4.0)
    assert c.w == pytest.approx(-1.23265, abs=1e-5)
    assert c.tau == pytest.approx(17.7993, abs=1e-4)
    # reference table: all 1x1 -> 2.56, 3 x conv3x3 -> 1.05, all 3x3 -> 0.25
    assert c.gamma(("nor_conv_1x1",) * 6) == pytest.approx(2.56, abs=5e-3)
    assert c.gamma(("nor_conv_3x3",) * 3 + ("none",) * 3) == pytest.approx(1.05, abs=5e-3)
    assert calr_factor(50, 100, c.gamma(("nor_conv_1x1",) * 6)) == pytest.approx(0.170, abs=1e-3)


def test_complexity_counts_the_model_weights():
    """The analytic count equals the conv + linear weights the active subnet uses (biases/BN excluded)."""
    C, N = 4, 2
    model = NB201Supernet(C=C, N=N, in_channels=1, num_classes=7)
    for arch in (
        SMALLEST,
        LARGEST,
        BEST,
        ("avg_pool_3x3", "nor_conv_1x1", "none", "skip_connect", "none", "none"),
    ):
        arch = as_arch(arch)
        n = model.stem[0].weight.numel() + model.classifier.weight.numel()
        for layer in model.cells:
            if hasattr(layer, "edges"):
                for e, op in enumerate(arch):
                    if op.startswith("nor_conv"):
                        n += layer.edges[e][op][1].weight.numel()
            else:
                n += sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Conv2d))
        assert subnet_complexity(arch, C, N, 1, 7) == n


@pytest.mark.parametrize("gamma_max", [4.0, 2.0])
@pytest.mark.parametrize("space", [{}, {"C": 8, "N": 1, "in_channels": 1}])
def test_calr_gamma_endpoints(gamma_max, space):
    c = CaLR(gamma_max, **space)
    assert c.gamma(SMALLEST) == pytest.approx(gamma_max)
    assert c.gamma(LARGEST) == pytest.approx(1.0 / gamma_max)
    # none/skip/pool subnets all have the minimum complexity; gamma decreases with complexity
    assert c.gamma(("skip_connect", "avg_pool_3x3") * 3) == pytest.approx(gamma_max)
    gs = [c.gamma(("nor_conv_3x3",) * k + ("none",) * (6 - k)) for k in range(7)]
    assert all(a > b for a, b in zip(gs, gs[1:], strict=False))
    assert CaLR(1.0).gamma(BEST) == pytest.approx(1.0)  # gamma_max 1: plain linear decay
    with pytest.raises(ConfigError, match="gamma_max"):
        CaLR(0.5)


def test_lr_schedules():
    T = 100
    for gamma in (0.25, 1.0, 4.0):
        f = [calr_factor(t, T, gamma) for t in range(T + 1)]
        assert f[0] == 1.0 and f[-1] == 0.0
        assert all(a >= b for a, b in zip(f, f[1:], strict=False))
        assert f[50] == pytest.approx(0.5**gamma)
    assert calr_factor(30, T, 1.0) == pytest.approx(0.7)
    c = [cosine_factor(t, T) for t in range(T + 1)]
    assert c[0] == 1.0 and c[-1] == pytest.approx(0.0, abs=1e-12) and c[50] == pytest.approx(0.5)
    # high-complexity subnets keep a higher LR
    calr = CaLR(4.0)
    assert calr.factor(LARGEST, 50, T) > calr.factor(BEST, 50, T) > calr.factor(SMALLEST, 50, T)


# ---- momentum separation -------------------------------------------------------------------------------


def test_momentum_buffers_are_separate_per_group():
    model = tiny()
    opt = GroupedSGD(model.parameters(), OPS, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = batch()
    w = model.classifier.weight

    def step(arch, group):
        model.set_active_subnet(arch)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(group)

    step(BEST, "nor_conv_3x3")
    buf3 = opt.momentum_buffer("nor_conv_3x3", w).clone()
    assert opt.momentum_buffer("skip_connect", w) is None
    step(("skip_connect",) * 6, "skip_connect")
    assert not torch.equal(opt.momentum_buffer("skip_connect", w), buf3)
    assert torch.equal(opt.momentum_buffer("nor_conv_3x3", w), buf3)  # inactive group: unchanged
    assert opt.steps == {
        "none": 0,
        "skip_connect": 1,
        "nor_conv_1x1": 0,
        "nor_conv_3x3": 1,
        "avg_pool_3x3": 0,
    }
    # state round trip
    opt2 = GroupedSGD(model.parameters(), OPS, lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.momentum_buffer("nor_conv_3x3", w), buf3)
    assert opt2.steps == opt.steps


def test_train_supernet_uses_ms_groups_and_calr():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    cfg = SupernetConfig(method="spos_calr_ms", epochs=2, iters=5, C=4, N=1, split_edge=2)
    model = tiny()
    seen = []
    hist = train_supernet(model, loader, cfg, log=None, on_epoch=lambda e, r: seen.append(e))
    assert seen == [0, 1] and len(hist) == 2
    assert sum(sum(h["group_steps"].values()) for h in hist) == 10
    assert set(hist[0]["group_steps"]) == set(OPS) and hist[0]["split_edge"] == 2
    assert all(math.isfinite(h["train_loss"]) for h in hist)
    # the group steps follow the sampled subnets' op on the split edge
    rng = random.Random(cfg.seed)
    ops = [sample_arch(rng)[2] for _ in range(10)]
    for g in OPS:
        assert sum(h["group_steps"][g] for h in hist) == ops.count(g)
    # baseline: one shared group, cosine LR (mean LR of epoch 0 > epoch 1)
    base = train_supernet(tiny(), loader, SupernetConfig(epochs=2, iters=5, C=4, N=1), log=None)
    assert list(base[0]["group_steps"]) == ["shared"]
    assert base[0]["lr_mean"] > base[1]["lr_mean"] > 0
    assert cfg.resolved_split_edge() == 2
    with pytest.raises(ConfigError, match="supernet.N: the config says 2, the model has 1"):
        train_supernet(tiny(), loader, SupernetConfig(epochs=1, iters=1, C=4, N=2), log=None)
    model = build_supernet(SupernetConfig(C=4, N=1, bn_track_running_stats=True), 1, 10)
    assert model.track_running_stats and model.C == 4 and len(model.cells) == 5
    assert SupernetConfig(method="spos_calr_ms", seed=3).resolved_split_edge() in range(6)
    assert SupernetConfig(method="spos").resolved_split_edge() is None


def test_summed_lr_matched_control_gives_spos_calrs_lr_sum_on_the_same_subnets():
    """summed_lr: calr: the SPOS run's cosine LR is scaled so that its sum over the run equals what CaLR gives
    the same subnet sequence; its subnets and momentum stay SPOS's."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))), batch_size=8)
    cfg = SupernetConfig(epochs=2, iters=5, C=4, N=1, summed_lr="calr", lr=0.1)
    model = tiny()
    hist = train_supernet(model, loader, cfg, log=None)
    rng = random.Random(cfg.seed)
    archs = [sample_arch(rng) for _ in range(10)]
    calr = CaLR.for_model(model, cfg.gamma_max)
    want = cfg.lr * sum(calr.factor(a, t, 10) for t, a in enumerate(archs))
    assert sum(h["lr_mean"] * 5 for h in hist) == pytest.approx(want)
    assert calr_matched_scale(calr, archs) * sum(cosine_factor(t, 10) for t in range(10)) == pytest.approx(want / cfg.lr)
    plain = train_supernet(tiny(), loader, SupernetConfig(epochs=2, iters=5, C=4, N=1, lr=0.1), log=None)
    assert sum(h["lr_mean"] for h in plain) == pytest.approx(sum(h["lr_mean"] for h in hist) / calr_matched_scale(calr, archs))
    assert list(hist[0]["group_steps"]) == ["shared"]
    with pytest.raises(ConfigError, match="supernet.summed_lr"):
        SupernetConfig(method="spos_calr_ms", summed_lr="calr")


# ---- supernet -----------------------------------------------------------------------------------------


def test_set_active_subnet_changes_output():
    model = tiny().eval()
    x, _ = batch()
    outs = {}
    for arch in (BEST, ALL3, ("nor_conv_1x1",) * 6, ("avg_pool_3x3",) * 6):
        outs[arch] = model.set_active_subnet(arch)(x)
        assert outs[arch].shape == (8, 10)
    keys = list(outs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.allclose(outs[keys[i]], outs[keys[j]])
    # a string, a tuple and an index name the same subnet
    assert torch.equal(model.set_active_subnet(arch_to_str(BEST))(x), outs[BEST])
    with pytest.raises(ConfigError):
        model.set_active_subnet(("conv5x5",) * 6)
    with pytest.raises(RuntimeError, match="set_active_subnet"):
        tiny()(x)


def test_none_ops_zero_the_edge():
    model = tiny().eval()
    x = torch.randn(4, 4, 28, 28)
    cell = model.cells[0]
    # every edge none: the cell outputs zeros
    assert torch.equal(cell(x, ("none",) * 6), torch.zeros_like(x))
    # node 3 = node0 (skip on 3<-0) only: the other edges into node 3 are none
    assert torch.equal(
        cell(x, ("nor_conv_3x3", "nor_conv_3x3", "nor_conv_3x3", "skip_connect", "none", "none")), x
    )
    # a none edge contributes exactly zero: 1<-0 none makes node 1 = 0, so 3<-1 skip adds nothing
    a = ("none", "none", "none", "skip_connect", "skip_connect", "none")
    assert torch.equal(cell(x, a), x)
    # equivalence with explicit zero-multiplication (the official 'none' op)
    arch = ("nor_conv_1x1", "none", "nor_conv_3x3", "avg_pool_3x3", "none", "skip_connect")
    n1 = cell.edges[0]["nor_conv_1x1"](x)
    n2 = cell.edges[2]["nor_conv_3x3"](n1)
    n3 = cell.edges[3]["avg_pool_3x3"](x) + n2 + 0 * n1
    assert torch.allclose(cell(x, arch), n3)
    # the whole supernet still produces logits when every cell is empty
    logits = model.set_active_subnet(("none",) * 6)(batch()[0])
    assert torch.isfinite(logits).all()


def test_recalibrate_and_evaluate():
    x, y = batch(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    # DYNAS default: no running statistics -> nothing to recalibrate
    assert recalibrate_bn(tiny(), loader, 2) == 0
    model = tiny(track_running_stats=True)
    bn = model.stem[1]
    bn.running_mean.fill_(5.0)
    assert recalibrate_bn(model.set_active_subnet(BEST), loader, 2) == 2
    assert bn.momentum == 0.1 and not torch.allclose(bn.running_mean, torch.full_like(bn.running_mean, 5.0))
    with torch.no_grad():
        h = model.stem[0](x)
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    archs = [BEST, ALL3, ("none",) * 6]
    for m in (tiny(), model):
        accs = evaluate_subnets(m, archs, loader, loader, bn_batches=2)
        assert len(accs) == 3 and all(0.0 <= a <= 100.0 for a in accs)
    assert accs[2] == 100.0 * float(
        (y == model.set_active_subnet(("none",) * 6).eval()(x).argmax(1)).float().mean()
    )


# ---- ranking ------------------------------------------------------------------------------------------


def test_kendall_tau_known_orderings():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ConfigError, match="equal length"):
        kendall_tau([1, 2], [1, 2, 3])
    cells = [0, 1, 11663, 15624]
    truth = {c: float(i) for i, c in enumerate(cells)}
    est = {arch_to_str(as_arch(c)): -float(i) for i, c in enumerate(cells)} | {5: 0.0}
    r = subset_kendall(est, truth, cells)
    assert r["tau"] == pytest.approx(-1.0) and r["n"] == 4 and r["top1_true"] == 0.0
    assert subset_kendall(truth, truth, cells[:3])["tau"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="no truth score"):
        subset_kendall(est, truth, [5])


# ---- config -------------------------------------------------------------------------------------------


def test_config_round_trip_and_errors():
    cfg = SupernetConfig.from_dict({"method": "spos_calr_ms", "epochs": 3, "C": 8, "N": 1})
    assert SupernetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.use_calr and cfg.use_ms
    assert not SupernetConfig().use_calr and not SupernetConfig().use_ms
    assert SupernetConfig().make_calr(tiny()) is None
    model = tiny()
    own = SupernetConfig(method="spos_calr_ms").make_calr(model)
    official = SupernetConfig(method="spos_calr_ms", calr_complexity="nb201").make_calr(model)
    assert own.c_min == subnet_complexity(SMALLEST, 4, 1, 1, 10) and official.c_min == 72752
    assert own.gamma(LARGEST) == pytest.approx(official.gamma(LARGEST))
    assert own.gamma(BEST) != pytest.approx(official.gamma(BEST))
    ablation = SupernetConfig(method="spos_calr_ms", ms=False)
    assert ablation.use_calr and not ablation.use_ms
    cases = {
        "supernet.bogus: unknown key": {"bogus": 1},
        "supernet.method": {"method": "darts"},
        "supernet.gamma_max": {"gamma_max": 0.5},
        "supernet.calr_complexity": {"calr_complexity": "flops"},
        "supernet.epochs": {"epochs": 0},
        "supernet.iters": {"iters": 0},
        "supernet.iters ": {"iters": "many"},
        "supernet.grad_clip": {"grad_clip": "x"},
        "supernet.lr": {"lr": "fast"},
        "supernet.momentum": {"momentum": 1.0},
        "supernet.split_edge": {"split_edge": 6},
        "supernet.calr": {"calr": "yes"},
    }
    for msg, d in cases.items():
        with pytest.raises(ConfigError, match=msg.strip().replace(".", r"\.")) as err:
            SupernetConfig.from_dict(d)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^nas\.supernet\.method"):
        SupernetConfig.from_dict({"method": "x"}, prefix="nas.supernet")


def test_seed_agreement_is_the_ground_truths_own_ceiling():
    """Kendall tau between the stand-alone runs of the same cells, averaged over seed pairs; None without two
    runs per cell (one seed, or the NAS-Bench-201 table)."""
    runs = [(1.0, 1.0, 3.0), (2.0, 3.0, 1.0), (3.0, 2.0, 2.0), (4.0, 4.0, 4.0)]
    records = [{"runs": [{"test_acc": a} for a in r]} for r in runs]
    pairs = [kendall_tau([r[i] for r in runs], [r[j] for r in runs]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert seed_agreement(records) == pytest.approx(sum(pairs) / 3)
    assert seed_agreement([{"runs": [{"test_acc": 1.0}]}, {"runs": [{"test_acc": 2.0}]}]) is None
    assert seed_agreement([{"test_acc": 1.0}, {"test_acc": 2.0}]) is None
