"""GDFQ: KD reductions and student loss on fixed tensors, BN-statistics loss, generator/student alternation with
warm-up, and a tiny end-to-end run (8x8 inputs keep the generator and ResNet-20 cheap)."""

import math

import pytest
import torch
from method_helpers import quant_context
from torch import nn

from zsqpipe.data import forbid_real_data
from zsqpipe.errors import ConfigError
from zsqpipe.methods.gdfq import GDFQ
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.generator_qat import kd_loss

SHAPE = (1, 8, 8)


def tiny_ctx(end_epoch=None, seed=0):
    return quant_context(seed=seed, end_epoch=end_epoch)


def act_ranges(model):
    return [(float(m.x_min), float(m.x_max)) for m in model.modules() if hasattr(m, "x_min")]


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_kd_reductions_hand_computed():
    # teacher logits / T = (ln 3, 0, 0, 0) -> p_t = (1/2, 1/6, 1/6, 1/6); student uniform p_s = 1/4
    t = torch.tensor([[2 * math.log(3), 0.0, 0.0, 0.0]] * 2)
    s = torch.zeros(2, 4)
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)  # = 0.5 ln(4/3) per sample
    assert kd_loss(s, t, 2.0, "batchmean").item() == pytest.approx(4 * kl, rel=1e-6)  # T^2 * KL
    assert kd_loss(s, t, 2.0, "mean").item() == pytest.approx(4 * kl / 4, rel=1e-6)  # / C (C = 4)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_official_kd_weight_is_t2_over_c():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    ref = nn.KLDivLoss()(torch.log_softmax(s / 20, 1), torch.softmax(t / 20, 1)) * 400  # GDFQ loss_fn_kd
    assert kd_loss(s, t, 20.0, "mean").item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_loss(s, t, 20.0, "mean").item() == pytest.approx(
        kd_loss(s, t, 20.0, "batchmean").item() / 10, rel=1e-5
    )


def test_student_loss_is_kd_plus_ce():
    m = GDFQ({"kd_temperature": 2.0})
    t = torch.tensor([[2 * math.log(3), 0.0, 0.0, 0.0]])
    s = torch.zeros(1, 4)
    expected = 0.5 * math.log(4 / 3) + math.log(4)  # 'mean' KD (T^2/C x KL) + CE of a uniform prediction
    assert m.student_loss(s, t, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-6)


def test_bn_statistics_loss_zero_when_statistics_match():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    ).eval()
    x = torch.randn(6, 1, 5, 5)
    with torch.no_grad():
        h = net[0](x)
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    bn = BNStatistics(net)
    net(x)
    assert bn.batch_loss().item() == pytest.approx(0.0, abs=1e-10)
    net(x + 1.0)  # mean off by the sum of the conv weights per channel
    assert bn.batch_loss().item() > 1e-3
    bn.remove()


def test_generator_step_gets_no_signal_from_student():
    ctx, _ = tiny_ctx()
    m = GDFQ({"batch_size": 4})
    gen = m.build_generator(ctx)
    opt = m.make_generator_optimizer(gen)
    before_g, before_t = params(gen), params(ctx.teacher)
    bn = BNStatistics(ctx.teacher)
    x, y, t_logits, loss = m.generator_step(
        gen, ctx.teacher, bn, opt, torch.Generator().manual_seed(0), ctx.device
    )
    bn.remove()
    assert x.shape == (4, *SHAPE) and not x.requires_grad and y.shape == (4,) and t_logits is None
    assert math.isfinite(loss)
    assert not same(before_g, params(gen))  # G stepped
    assert same(before_t, params(ctx.teacher))
    assert all(p.grad is None for p in ctx.student.parameters())  # nothing flowed through Q


def test_warmup_updates_ranges_and_generator_not_student_then_freezes_ranges():
    snaps = []
    m = GDFQ({"epochs": 2, "warmup_epochs": 1, "iters_per_epoch": 2, "batch_size": 4})

    def end_epoch(epoch, metrics):
        snaps.append((params(ctx.student), act_ranges(ctx.student), params(m.generator), metrics))
        return metrics

    ctx, _ = tiny_ctx(end_epoch)
    student0 = params(ctx.student)
    with forbid_real_data("gdfq test"):
        m.run(ctx)
    (s_warm, r_warm, g_warm, met_warm), (s_train, r_train, g_train, met_train) = snaps
    assert same(student0, s_warm)  # warm-up: the student is not stepped
    assert all(hi > lo for lo, hi in r_warm)  # ... but its activation ranges were calibrated
    assert met_warm["warmup"] == 1.0 and met_train["warmup"] == 0.0
    assert not same(s_warm, s_train)  # after warm-up the student trains
    assert r_train == r_warm  # with frozen ranges
    assert not same(g_warm, g_train)  # the generator trains in every epoch
    assert all(not q.update_ranges for q in ctx.student.modules() if hasattr(q, "update_ranges"))


def test_run_end_to_end_reads_no_real_data():
    ctx, history = tiny_ctx()
    cfg = {
        "epochs": 2,
        "warmup_epochs": 1,
        "iters_per_epoch": 1,
        "batch_size": 4,
        "kd_reduction": "batchmean",
    }
    with forbid_real_data("gdfq test"):
        GDFQ(cfg).run(ctx)
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["g_loss"]) for h in history)


def test_warmup_iters_sets_the_generator_steps_of_the_warmup_epochs_only():
    """warmup_iters = 3, iters_per_epoch = 2: 3 generator steps (ranges, no student step) + 2 student steps."""
    m = GDFQ({"epochs": 2, "warmup_epochs": 1, "warmup_iters": 3, "iters_per_epoch": 2, "batch_size": 4})
    calls = []
    orig_step, orig_loss = m.generator_step, m.student_loss
    m.generator_step = lambda *a: calls.append("g") or orig_step(*a)
    m.student_loss = lambda *a: calls.append("s") or orig_loss(*a)
    at_epoch_end = []

    def end_epoch(epoch, metrics):
        at_epoch_end.append((calls.count("g"), metrics["warmup"]))
        return metrics

    ctx, _ = tiny_ctx(end_epoch)
    with forbid_real_data("gdfq test"):
        m.run(ctx)
    assert "".join(calls) == "gs" * 5  # every generator step is followed by a student loss (logged in warm-up)
    assert at_epoch_end == [(3, 1.0), (5, 0.0)]


@pytest.mark.parametrize(
    "cfg",
    [{"warmup_epochs": 0}, {"epochs": 2, "warmup_epochs": 3}, {"kd_reduction": "sum"}, {"batch_size": 1},
     {"warmup_iters": -1}],
)
def test_bad_config_is_rejected(cfg):
    with pytest.raises(ConfigError):
        GDFQ(cfg)
