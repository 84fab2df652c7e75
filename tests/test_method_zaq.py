"""ZAQ: SCRM and the L1 logit discrepancy on fixed tensors, feature hook points, Q/G alternation (each step moves
only its own model), the generator's adversarial loss, both activation-range modes, a tiny end-to-end run."""

import math

import pytest
import torch
from method_helpers import quant_context
from torch import nn

from zsqpipe.data import forbid_real_data
from zsqpipe.errors import ConfigError
from zsqpipe.methods.zaq import (
    ZAQ,
    FeatureHooks,
    NonFiniteWatch,
    RunningMinMax,
    channel_normalise,
    channel_relation,
    default_feature_layers,
    scrm_loss,
    spatial_relation,
)
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig
from zsqpipe.zsq.generators import ZAQGenerator

SHAPE = (1, 8, 8)
STAGES = ("features.stage1", "features.stage2", "features.stage3")


def tiny_ctx(end_epoch=None, seed=0):
    return quant_context(seed=seed, end_epoch=end_epoch)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def act_ranges(model):
    return [(float(m.x_min), float(m.x_max)) for m in model.modules() if hasattr(m, "x_min")]


def test_scrm_hand_computed_orthogonal_positions():
    # B=1, C=2, positions (1,0) and (0,1): V = I. SA rows = softmax(I) (sum 1), CA rows = softmax(1 - I) (sum 1);
    # against a zero map (n(0) = 0, SA = CA = 0): mean|gamma*A + I| = (2*gamma + 2)/4 each, so SCRM = 1 + gamma.
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    ft = torch.zeros_like(fs)
    assert scrm_loss([fs], [ft], gamma=0.1).item() == pytest.approx(1.1, rel=1e-6)
    v = fs.flatten(2)
    e = math.e
    a = torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]])
    assert torch.allclose(spatial_relation(v, 0.1)[0], 0.1 * a + torch.eye(2), atol=1e-6)
    assert torch.allclose(channel_relation(v, 0.1)[0], 0.1 * a.flip(1) + torch.eye(2), atol=1e-6)


def test_scrm_hand_computed_single_channel():
    # C=1, values (3, -2) -> normalised (1, -1). SA: out = (a-b, b-a) with a-b = tanh(1); CA: softmax of a 1x1
    # map = 1, so CA = (1+gamma) V. Against zero: SCRM = (1 + gamma*tanh 1) + (1 + gamma).
    fs = torch.tensor([[[[3.0, -2.0]]]])
    gamma = 0.1
    expected = (1 + gamma * math.tanh(1)) + (1 + gamma)
    assert scrm_loss([fs], [torch.zeros_like(fs)], gamma).item() == pytest.approx(expected, rel=1e-6)
    # gamma = 0: both maps are the normalised features, SCRM = 2 * L1(n(f_s), n(f_t)); summed over pairs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    l1 = (nn.functional.normalize(a, dim=1) - nn.functional.normalize(b, dim=1)).abs().mean()
    assert scrm_loss([a, a], [b, b], gamma=0.0).item() == pytest.approx(4 * l1.item(), rel=1e-5)
    assert scrm_loss([a], [a], gamma=0.1).item() == 0.0


def test_safe_channel_normalise_same_values_finite_gradient_at_zero_vectors():
    f = torch.tensor([[[[0.0, 3.0]], [[0.0, 0.0]], [[0.0, 4.0]]]])  # position 0 is an all-zero vector
    w = torch.arange(6.0).view(1, 3, 1, 2)
    grads = {}
    for safe in (True, False):
        x = f.clone().requires_grad_(True)
        n = channel_normalise(x, safe)
        assert torch.allclose(n, nn.functional.normalize(f, dim=1))
        (n * w).sum().backward()
        grads[safe] = x.grad[0, :, 0, 0]
    assert torch.equal(grads[True], torch.tensor([0.0, 2.0, 4.0]))  # identity at the zero vector
    assert grads[False].abs().max() > 1e11  # official F.normalize: 1/eps
    assert scrm_loss([f], [2 * f], 0.1, safe=False).item() == pytest.approx(
        scrm_loss([f], [2 * f], 0.1).item()
    )


def test_discrepancy_is_l1_plus_alpha_scrm():
    m = ZAQ({"alpha": 2.0})
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.zeros(2, 2)
    fs = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert m.discrepancy(s, t, [fs], [fs]).item() == pytest.approx(2.5)  # mean |s - t|, SCRM 0
    assert m.discrepancy(s, t, [fs], [torch.zeros_like(fs)]).item() == pytest.approx(
        2.5 + 2.0 * 1.1, rel=1e-6
    )
    # safe_normalize reaches the SCRM: a student map with an all-zero position gets 1e12 gradients officially
    f0 = torch.tensor([[[[0.0, 1.0]], [[0.0, 2.0]]]])
    for safe, bound in ((True, 10.0), (False, 1e11)):
        x = f0.clone().requires_grad_(True)
        ZAQ({"safe_normalize": safe}).discrepancy(s, t, [x], [torch.ones_like(f0)]).backward()
        assert (x.grad.abs().max() < bound) if safe else (x.grad.abs().max() > bound)


def test_default_feature_layers():
    assert default_feature_layers(create_model("resnet20", 10, 1, 8), SHAPE) == STAGES
    assert default_feature_layers(create_model("resnet18", 10, 1, 8), SHAPE) == (
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    )

    class Net(nn.Module):  # no stage names: last block of `features` at each resolution
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 2, 3, 1, 1), nn.Conv2d(2, 2, 3, 1, 1), nn.Conv2d(2, 4, 3, 2, 1), nn.ReLU()
            )
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    assert default_feature_layers(Net(), SHAPE) == ("features.1", "features.3")
    with pytest.raises(ConfigError):
        FeatureHooks(Net(), ("nope",))


def _setup(cfg=None):
    ctx, _ = tiny_ctx()
    m = ZAQ({"batch_size": 4, **(cfg or {})})
    gen = ZAQGenerator(SHAPE, 16)
    hooks_t, hooks_s = FeatureHooks(ctx.teacher, STAGES), FeatureHooks(ctx.student, STAGES)
    opt_q = torch.optim.SGD(ctx.student.parameters(), lr=0.1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    ZAQ._track_ranges(ctx.student, None, True)
    return ctx, m, gen, (gen, ctx.teacher, ctx.student, hooks_t, hooks_s), opt_q, opt_g


def test_q_step_moves_only_the_student_and_g_step_only_the_generator():
    ctx, m, gen, args, opt_q, opt_g = _setup()
    g0, s0, t0 = params(gen), params(ctx.student), params(ctx.teacher)
    m.q_step(*args, opt_q, torch.Generator().manual_seed(0), ctx.device)
    g1, s1 = params(gen), params(ctx.student)
    assert same(g0, g1) and not same(s0, s1)
    m.g_step(*args, opt_g, torch.Generator().manual_seed(1), ctx.device)
    g2, s2 = params(gen), params(ctx.student)
    assert not same(g1, g2) and same(s1, s2)
    assert all(p.requires_grad for p in ctx.student.parameters())  # restored after the G step
    assert same(t0, params(ctx.teacher))


def test_g_step_loss_maximises_discrepancy_and_last_feature_magnitude():
    ctx, m, gen, args, opt_q, opt_g = _setup({"alpha": 1.0, "beta": 0.1})
    _, teacher, student, hooks_t, hooks_s = args
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the same latents, before the step (train-mode generator BN: batch statistics)
        x = gen(z)
        t_logits, s_logits = teacher(x), student(x)
        ft, fs = hooks_t.take(), hooks_s.take()
        l1 = (s_logits - t_logits).abs().mean()
        expected = -l1 - scrm_loss(fs, ft, 0.1) - 0.1 * ft[-1].abs().mean()
    loss = m.g_step(*args, opt_g, torch.Generator().manual_seed(5), ctx.device)
    assert loss == pytest.approx(expected.item(), rel=1e-4)


def test_minmax_ranges_only_grow_and_skip_evaluation():
    ctx, _ = tiny_ctx()
    mm = RunningMinMax(ctx.student)
    assert act_ranges(ctx.student) == [(0.0, 0.0)] * len(mm.quantizers)
    mm.active = True
    ctx.student(torch.randn(4, *SHAPE))
    r1 = act_ranges(ctx.student)
    ctx.student(0.01 * torch.randn(4, *SHAPE))  # smaller activations: ranges keep their max
    r2 = act_ranges(ctx.student)
    assert r1 == r2 and all(lo == 0.0 and hi > 0 for lo, hi in r1)  # post-ReLU: min stays at 0
    ctx.student(10 * torch.randn(4, *SHAPE))
    assert all(b[1] >= a[1] for a, b in zip(r2, act_ranges(ctx.student), strict=True))
    mm.active = False
    r3 = act_ranges(ctx.student)
    ctx.student(100 * torch.randn(4, *SHAPE))
    assert act_ranges(ctx.student) == r3
    mm.remove()


@pytest.mark.parametrize("range_mode", ["ema", "minmax"])
def test_run_end_to_end_range_modes(range_mode):
    snaps = []
    m = ZAQ(
        {"epochs": 2, "iters_per_epoch": 1, "q_steps": 2, "batch_size": 4, "nz": 16, "range_mode": range_mode}
    )

    def end_epoch(epoch, metrics):
        r = act_ranges(ctx.student)
        ctx.student.eval()
        with torch.no_grad():
            ctx.student(50 * torch.randn(4, *SHAPE))  # evaluation must not move the ranges
        assert act_ranges(ctx.student) == r
        snaps.append((r, params(m.generator), metrics))
        return metrics

    ctx, _ = tiny_ctx(end_epoch)
    with forbid_real_data("zaq test"):
        m.run(ctx)
    (r0, g0, met0), (r1, g1, met1) = snaps
    assert not same(g0, g1)
    assert all(
        math.isfinite(v) for v in (met0["train_loss"], met0["g_loss"], met1["train_loss"], met1["g_loss"])
    )
    assert not [k for k in (*met0, *met1) if k.startswith("first_nonfinite")]  # only when a loss was not finite
    if range_mode == "ema":
        assert r0 == r1  # calibrated in epoch 0, frozen afterwards
    else:
        assert all(b[1] >= a[1] for a, b in zip(r0, r1, strict=True))  # official: never frozen, only grows
    assert all(not q.update_ranges for q in ctx.student.modules() if hasattr(q, "update_ranges"))


@pytest.mark.parametrize(
    "cfg", [{"range_mode": "official"}, {"calib_epochs": 0}, {"epochs": 1, "calib_epochs": 2}, {"q_steps": 0}]
)
def test_bad_config_is_rejected(cfg):
    with pytest.raises(ConfigError):
        ZAQ(cfg)


def test_non_finite_watch_reports_the_first_iteration_once():
    lines = []
    watch = NonFiniteWatch(lines.append)
    for it, (q, g) in enumerate([(1.0, -2.0), (0.5, float("nan")), (float("inf"), float("nan")), (float("nan"), 1.0)]):
        watch.see("student", q, it)
        watch.see("generator", g, it)
    assert watch.metrics() == {"first_nonfinite_generator_iter": 1, "first_nonfinite_student_iter": 2}
    assert lines == [
        "zaq: generator loss not finite from iteration 1 on (last finite -2)",
        "zaq: student loss not finite from iteration 2 on (last finite 0.5)",
    ]


def test_minmax_ranges_take_the_running_max_of_the_quantizers_vote():
    """With ``quant.act_quantizer: ema_mse`` the official running max grows by each batch's MSE clip, not its max."""
    ctx, _ = quant_context(quant=QuantConfig(weight_bits=4, act_bits=3, act_quantizer="ema_mse"))
    mm = RunningMinMax(ctx.student)
    mm.active = True
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    votes = {}
    hooks = [q.register_forward_pre_hook(lambda q, a: votes.__setitem__(q, q.batch_range(a[0])[1])) for q in mm.quantizers]
    maxima = {}
    hooks += [q.register_forward_pre_hook(lambda q, a: maxima.__setitem__(q, a[0].detach().max())) for q in mm.quantizers]
    ctx.student(x)
    for h in hooks:
        h.remove()
    mm.remove()
    assert all(torch.equal(q.x_max, votes[q]) for q in mm.quantizers)
    assert any(float(votes[q]) < float(maxima[q]) for q in mm.quantizers)
