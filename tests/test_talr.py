"""Transition-rate scheduling (TALR): transition counting, Eqs. 10-12, the target schedule, options."""

import math

import pytest
import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.quant import QuantConfig, quantize_model
from zsqpipe.quant.talr import TALR, TALRConfig, freeze_weight_scales, talr_param_groups


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2, bias=False)
        self.relu = nn.ReLU()
        self.b = nn.Linear(2, 2, bias=True)

    def forward(self, x):
        return self.b(self.relu(self.a(x)))


def unit_step_model(weight_quantizer="lsq_tensor"):
    """Weights with step 1, so the integer level of w is round(w)."""
    model = quantize_model(
        TwoLayer(),
        QuantConfig(weight_bits=4, act_bits=4, weight_quantizer=weight_quantizer, act_quantizer="lsq"),
    )
    model(torch.ones(1, 4))  # initialises the steps
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[0.2, 0.6, -0.4, 1.45], [2.0, -1.2, 0.0, 0.49]]))
        model.b.weight.copy_(torch.tensor([[0.1, 0.9], [-0.6, 3.0]]))
        for m in (model.a, model.b):
            m.weight_quantizer.scale.fill_(1.0)
    return model


def talr_index(talr, module):
    for i, layers in enumerate(talr.layers):
        if any(m is module for _, m in layers):
            return i
    raise KeyError(module)


def make_talr(model, total_steps=10, **cfg):
    cfg = TALRConfig(**cfg)
    opt = torch.optim.SGD(talr_param_groups(model, cfg.scope, lr=0.0), lr=1.0)
    return TALR(opt, model, total_steps, cfg)


def test_transition_counting_on_hand_made_weight_changes():
    model = unit_step_model()
    talr = make_talr(model, momentum=0.9, eta=1e-3, target_rate=0.5)
    a, b = model.a, model.b
    # a: 0.2->0.4 (stays 0), 0.6->0.4 (1->0), -0.4->-0.6 (0->-1), 1.45->1.55 (1->2), 2.0->2.3 (stays),
    #    -1.2->-1.2, 0.0->0.0, 0.49->0.51 (0->1): 4 of 8 change level
    da = [[0.2, -0.2, -0.2, 0.1], [0.3, 0.0, 0.0, 0.02]]
    db = [[0.0, 0.0], [0.0, 0.0]]  # b: no change
    a.weight.grad = -torch.tensor(da)
    b.weight.grad = -torch.tensor(db)
    talr.step()
    assert torch.allclose(a.weight, torch.tensor([[0.4, 0.4, -0.6, 1.55], [2.3, -1.2, 0.0, 0.51]]))
    i_a, i_b = talr_index(talr, a), talr_index(talr, b)
    assert talr.k[i_a] == pytest.approx(4 / 8) and talr.k[i_b] == 0.0
    assert talr.K[i_a] == pytest.approx(0.1 * 0.5) and talr.K[i_b] == 0.0
    # second step, b: 0.9 -> 0.2 (1->0), 3.0 -> 3.4 (stays): 1 of 4; a unchanged
    u_b = talr.U[i_b]
    a.weight.grad = torch.zeros(2, 4)
    b.weight.grad = -torch.tensor([[0.0, -0.7], [0.0, 0.4]]) / u_b
    talr.step()
    assert talr.k[i_a] == 0.0 and talr.k[i_b] == pytest.approx(1 / 4)
    assert talr.K[i_a] == pytest.approx(0.9 * 0.05)
    assert talr.K[i_b] == pytest.approx(0.1 * 0.25)


def test_global_scope_counts_all_quantized_weights_together():
    model = unit_step_model()
    talr = make_talr(model, scope="global", target_rate=0.5)
    assert len(talr.groups) == 1 and len(talr.layers[0]) == 2
    model.a.weight.grad = -torch.tensor([[0.2, -0.2, -0.2, 0.1], [0.3, 0.0, 0.0, 0.02]])
    model.b.weight.grad = -torch.tensor([[0.0, -0.7], [0.0, 0.0]])
    talr.step()
    assert talr.k == [pytest.approx(5 / 12)]
    assert list(talr.stats()) == ["global"]


def test_talr_update_follows_eq_11_and_is_never_negative():
    torch.manual_seed(0)
    model = quantize_model(
        TwoLayer(), QuantConfig(weight_bits=2, act_bits=2, weight_quantizer="lsq", act_quantizer="lsq")
    )
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    model(x)
    cfg = TALRConfig(momentum=0.5, eta=0.5, target_rate=1e-4, schedule="constant")
    opt = torch.optim.SGD(talr_param_groups(model, "layer", lr=0.1), lr=1.0)
    talr = TALR(opt, model, 50, cfg)
    seen_zero = False
    applied, regulating = [0.0] * len(talr.U), [None] * len(talr.U)
    for t in range(1, 51):
        u_prev, k_prev = list(talr.U), list(talr.K)
        talr.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        talr.step()
        for i in range(len(talr.U)):
            applied[i] += u_prev[i]  # the step used the U of before it
            if regulating[i] is None and talr.K[i] > 1e-4 and u_prev[i] > 0:
                regulating[i] = t  # the first step at which U falls
            assert talr.K[i] == pytest.approx(0.5 * k_prev[i] + 0.5 * talr.k[i])
            assert talr.U[i] == pytest.approx(max(0.0, u_prev[i] + 0.5 * (1e-4 - talr.K[i])))
            assert talr.U[i] >= 0.0
            assert talr.groups[i]["lr"] == talr.U[i]
            seen_zero |= talr.U[i] == 0.0
    assert seen_zero  # many transitions at lr 1 vs a tiny target: U hits the floor at 0
    summary = talr.summary()
    assert list(summary["lr_sum"].values()) == pytest.approx(applied)
    assert summary["lr_sum_mean"] == pytest.approx(sum(applied) / len(applied))
    assert list(summary["regulating_step"].values()) == regulating and None not in regulating
    assert summary["regulating_fraction"] == 1.0 and summary["regulating_target_median"] == 1.0  # constant R
    assert summary["steps"] == 50 and summary["trace"]["step"] == list(range(1, 51))
    assert summary["trace"]["U"][-1] == pytest.approx(sum(talr.U) / len(talr.U))
    # the summary survives a checkpoint
    again = TALR(opt, model, 50, cfg)
    again.load_state_dict(talr.state_dict())
    assert again.summary() == summary


def test_talr_that_never_catches_its_target_reports_no_regulating_step():
    model = unit_step_model()
    talr = make_talr(model, eta=0.1, target_rate=0.2, schedule="constant")
    model.a.weight.grad, model.b.weight.grad = torch.zeros(2, 4), torch.zeros(2, 2)
    talr.step()  # no transitions: K = 0 < R, U only grows
    summary = talr.summary()
    assert summary["regulating_fraction"] == 0.0 and summary["regulating_step_median"] is None
    assert set(summary["regulating_step"].values()) == {None}


def test_zero_talr_freezes_latent_weights_and_increases_when_below_target():
    model = unit_step_model()
    talr = make_talr(model, eta=0.1, target_rate=0.2, schedule="constant")
    for i in range(len(talr.U)):
        talr.U[i] = 0.0
    w = model.a.weight.detach().clone()
    model.a.weight.grad = torch.ones(2, 4)
    model.b.weight.grad = torch.ones(2, 2)
    talr.step()
    assert torch.equal(model.a.weight, w)  # U = 0: no latent update
    assert all(k == 0.0 for k in talr.k)
    assert all(u == pytest.approx(0.1 * 0.2) for u in talr.U)  # K = 0 < R: U grows by eta * R


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_target_schedule_values(schedule):
    cfg = TALRConfig(schedule=schedule, milestones=(0.5, 0.75), decay=0.1)
    r = [cfg.target(0.01, t, 100) for t in (0, 25, 50, 75, 100, 200)]
    expected = {
        "cosine": [
            0.01,
            0.01 * (1 + math.cos(math.pi / 4)) / 2,
            0.005,
            0.01 * (1 - math.cos(math.pi / 4)) / 2,
            0,
            0,
        ],
        "step": [0.01, 0.01, 0.001, 0.0001, 0.0001, 0.0001],
        "constant": [0.01] * 6,
    }[schedule]
    assert r == pytest.approx(expected, abs=1e-12)


def test_default_targets_scale_with_sqrt_bits_and_follow_the_schedule_in_training():
    model = quantize_model(
        TwoLayer(),
        QuantConfig(
            weight_bits=2, act_bits=2, weight_quantizer="lsq", act_quantizer="lsq", layer_bits={"b": 8}
        ),
    )
    model(torch.ones(1, 4))
    talr = make_talr(model, total_steps=4)
    i_a, i_b = talr_index(talr, model.a), talr_index(talr, model.b)
    assert talr.R0[i_a] == pytest.approx(5e-3 * math.sqrt(2)) and talr.R0[i_b] == pytest.approx(
        5e-3 * math.sqrt(8)
    )
    glob = make_talr(model, scope="global")
    assert glob.R0[0] == pytest.approx((8 * 5e-3 * math.sqrt(2) + 4 * 5e-3 * math.sqrt(8)) / 12)
    for t in range(1, 5):
        for m in (model.a, model.b):
            m.weight.grad = torch.zeros_like(m.weight)
        talr.step()
        assert talr.R[i_a] == pytest.approx(talr.R0[i_a] * 0.5 * (1 + math.cos(math.pi * t / 4)))
    assert talr.R[i_a] == pytest.approx(0.0, abs=1e-15)


def test_param_groups_scales_and_scheduler_interplay():
    model = quantize_model(
        TwoLayer(), QuantConfig(weight_bits=4, act_bits=4, weight_quantizer="lsq", act_quantizer="lsq")
    )
    model(torch.ones(2, 4))
    groups = talr_param_groups(model, "layer", lr=0.05, weight_decay=0.0)
    assert [g["talr_layers"] for g in groups[:2]] == [["a"], ["b"]]
    rest = {id(p) for p in groups[2]["params"]}
    assert id(model.b.bias) in rest and id(model.a.weight) not in rest and groups[2]["lr"] == 0.05
    opt = torch.optim.SGD(groups, lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    talr = TALR(opt, model, 10, TALRConfig(eta=0.1))
    assert not model.a.weight_quantizer.scale.requires_grad
    assert model.relu[1].quantizer.scale.requires_grad  # activation steps keep training
    assert talr.U == [0.2, 0.2]
    lr_seen = []
    opt.register_step_pre_hook(lambda o, *_: lr_seen.append([g["lr"] for g in o.param_groups][:2]))
    for _ in range(2):
        talr.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        u = list(talr.U)
        talr.step()
        sched.step()
        assert lr_seen[-1] == u and u != [g["lr"] for g in opt.param_groups][:2]
    freeze_weight_scales(model)
    with pytest.raises(ConfigError, match="talr_layers"):
        TALR(torch.optim.SGD(model.parameters(), lr=0.1), model, 10)


def test_config_round_trip_and_errors():
    cfg = TALRConfig(scope="global", milestones=(0.3,), eta=0.01)
    d = cfg.to_dict()
    assert d["scope"] == "global" and TALRConfig.from_dict(d) == cfg
    assert TALRConfig.from_dict({"milestones": [0.2, 0.4]}).milestones == (0.2, 0.4)
    with pytest.raises(ConfigError, match="talr.scope"):
        TALRConfig(scope="model")
    with pytest.raises(ConfigError, match="talr.bogus"):
        TALRConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="no quantized layer"):
        talr_param_groups(TwoLayer())
