"""LSQ quantizers (``lsq``, ``lsq_tensor``, ``lsq_nopost``, ``lsq_nopost_fixed``): forward against PyTorch's
fake-quant kernels, gradients against the LSQ / TRS Eq. 13 formulas written out by hand."""

import copy
import math

import pytest
import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state
from zsqpipe.quant.quantize import count_bitops, quant_layers
from zsqpipe.quant.quantizers import (
    QUANTIZERS,
    LSQFixedPostQuantizer,
    LSQNoPostQuantizer,
    LSQQuantizer,
    LSQTensorQuantizer,
    MinMaxChannelQuantizer,
    create_quantizer,
)


def lsq_grads_by_hand(x, s, qn, qp, dy):
    """LSQ paper Eq. 3 elementwise (float64): dL/dx (clipped STE) and dL/ds before the gradient scale."""
    v = x.double() / s.double()
    inside = (v > qn) & (v < qp)
    ds = torch.where(v <= qn, float(qn), torch.where(v >= qp, float(qp), torch.round(v) - v))
    return (dy.double() * inside).float(), dy.double() * ds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_forward_matches_pytorch_per_channel(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 3, 3)
    q = create_quantizer("lsq", "weight", bits)
    out = q(w)
    s = q.scale.detach()
    assert s.shape == (6,)
    expected_s = 2 * w.abs().flatten(1).mean(1) / math.sqrt(2 ** (bits - 1) - 1)
    assert torch.allclose(s, expected_s)
    zp = torch.zeros(6, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(w, s, zp, 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(out.detach(), ref)
    assert torch.equal(q.levels(w).float() * s.view(-1, 1, 1, 1), ref)


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_act_and_tensor_weight_forward_match_pytorch(bits):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 4, 5, 5)) * 3
    qa = create_quantizer("lsq", "act", bits)
    out = qa(x)
    s = qa.scale.item()
    assert qa.scale.shape == () and s == pytest.approx(2 * x.mean().item() / math.sqrt(2**bits - 1), rel=1e-6)
    assert torch.equal(out.detach(), torch.fake_quantize_per_tensor_affine(x, s, 0, 0, 2**bits - 1))
    w = torch.randn(5, 7)
    qw = create_quantizer("lsq_tensor", "weight", bits)
    out = qw(w).detach()
    assert qw.scale.shape == ()
    ref = torch.fake_quantize_per_tensor_affine(
        w, qw.scale.item(), 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    )
    assert torch.equal(out, ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_formula(per_channel):
    torch.manual_seed(1)
    bits = 3
    qn, qp = -4, 3
    q = LSQQuantizer(bits, kind="weight", per_channel=per_channel)
    w = (torch.randn(4, 6) * 2).requires_grad_(True)
    q.observe(w)
    with torch.no_grad():  # a step that clips a good part of the weights
        q.scale.copy_(torch.full_like(q.scale, 0.45))
    dy = torch.randn(4, 6)
    q(w).backward(dy)
    s = q.scale.detach().view(-1, 1) if per_channel else q.scale.detach()
    gx, ds = lsq_grads_by_hand(w.detach(), s, qn, qp, dy)
    g = 1 / math.sqrt(w.numel() * qp)
    assert torch.equal(w.grad, gx)
    assert 0 < int((gx == 0).sum()) < w.numel()  # some clipped, some not
    ref = ds.sum(1) * g if per_channel else ds.sum() * g
    assert torch.allclose(q.scale.grad.double(), ref, rtol=1e-5, atol=1e-7)


def test_lsq_gradients_match_pytorch_learnable_fake_quant():
    """PyTorch's LSQ kernel (torch.ao's _LearnableFakeQuantize) agrees away from the clipping edges (it decides
    "clipped" on round(v), LSQ on v, which differ only for v within 0.5 outside [Q_N, Q_P])."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, 5) * 2
    s = torch.tensor(0.3)
    v = x / s
    x = x[(v < -8.5) | ((v > -8) & (v < 7)) | (v > 7.5)].requires_grad_(True)
    q = LSQTensorQuantizer(4, kind="weight")
    q.observe(x)
    with torch.no_grad():
        q.scale.copy_(s)
    dy = torch.randn_like(x)
    q(x).backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    s2 = s.clone().view(1).requires_grad_(True)
    g = 1 / math.sqrt(x.numel() * 7)
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, torch.zeros(1), -8, 7, g)
    y2.backward(dy)
    assert torch.equal(q(x).detach(), y2.detach())
    assert torch.equal(x.grad, x2.grad)
    assert torch.allclose(q.scale.grad, s2.grad[0], rtol=1e-5)


def test_lsq_nopost_forward_and_backward_follow_eq13():
    torch.manual_seed(3)
    for kind, (alpha, beta, gamma) in {"weight": (-4, 3, 4), "act": (0, 7, 8)}.items():
        q = LSQNoPostQuantizer(3, kind=kind)
        x = torch.randn(64) * 2 if kind == "weight" else torch.rand(64) * 4
        x.requires_grad_(True)
        q.observe(x)
        with torch.no_grad():
            q.scale.fill_(1.7)
        s = 1.7
        out = q(x)
        expected = torch.round(torch.clamp(gamma * x.detach() / s, alpha, beta)) / gamma
        assert torch.allclose(out.detach(), expected, atol=1e-6)
        assert out.min() >= alpha / gamma and out.max() <= beta / gamma
        dy = torch.randn(64)
        out.backward(dy)
        v = gamma * x.detach() / s
        inside = (v > alpha) & (v < beta)
        assert torch.allclose(x.grad, dy * inside / s)
        g = 1 / math.sqrt(64 * beta)
        ds = (dy * torch.where(inside, -x.detach() / s**2, 0.0)).sum() * g
        assert q.scale.grad.item() == pytest.approx(ds.item(), rel=1e-5)
        assert q.gamma == gamma and (q.q_n, q.q_p) == (alpha, beta)


def test_lsq_nopost_init_keeps_lsq_step_and_fixed_post_scale():
    torch.manual_seed(4)
    w = torch.randn(16, 8)
    lsq = LSQTensorQuantizer(4, kind="weight")
    nopost = LSQNoPostQuantizer(4, kind="weight")
    fixed = LSQFixedPostQuantizer(4, kind="weight")
    ref = lsq(w)
    nopost(w), fixed(w)
    assert nopost.scale.item() == pytest.approx(8 * lsq.scale.item(), rel=1e-6)  # step s / gamma = LSQ's
    assert torch.allclose(fixed(w), ref, atol=1e-6)  # fixed de-normalisation: LSQ's output at init
    assert torch.allclose(nopost(w) * lsq.scale.item() * 8, ref, atol=1e-5)
    post = fixed.post.clone()
    with torch.no_grad():
        fixed.scale.mul_(2)
    assert torch.equal(fixed.post, post)
    out = fixed(w)
    assert torch.allclose(out / post, torch.round(torch.clamp(8 * w / fixed.scale.item(), -8, 7)))


def test_calibration_initialises_the_step_as_a_running_mean():
    a, b = torch.rand(4, 10) * 2, torch.rand(4, 10) * 6
    q = LSQQuantizer(4, kind="act")
    q.update_ranges = True
    q(a), q(b)
    expected = (a.mean() + b.mean()) * 2 / math.sqrt(15) / 2
    assert q.scale.item() == pytest.approx(float(expected), rel=1e-6)
    q.update_ranges = False
    q(torch.rand(4, 10) * 100)  # frozen after calibration
    assert q.scale.item() == pytest.approx(float(expected), rel=1e-6)


def test_uncalibrated_disabled_quantizer_is_not_initialised():
    q = LSQQuantizer(4, kind="act")
    q.enabled = False
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3))
    assert q._n == 0 and int(q.num_updates) == 0
    q.enabled = True
    q(torch.full((3,), 2.0))
    assert q.scale.item() == pytest.approx(2 * 2.0 / math.sqrt(15))


def test_minmax_channel_levels_reproduce_its_output():
    torch.manual_seed(5)
    w = torch.randn(5, 3, 3, 3)
    q = MinMaxChannelQuantizer(3)
    lv = q.levels(w)
    assert lv.dtype == torch.int32
    flat = w.flatten(1)
    scale = (flat.max(1).values - flat.min(1).values) / 7
    assert torch.allclose(lv.float() * scale.view(-1, 1, 1, 1), q(w), atol=1e-6)
    assert int((lv.flatten(1).max(1).values - lv.flatten(1).min(1).values).max()) == 7


def test_registry_and_errors():
    assert {"lsq", "lsq_tensor", "lsq_nopost", "lsq_nopost_fixed"} <= set(QUANTIZERS)
    with pytest.raises(ConfigError, match="needs >= 2 bits"):
        create_quantizer("lsq", "weight", 1)
    assert create_quantizer("lsq", "act", 1).q_p == 1
    with pytest.raises(ConfigError, match="weights only"):
        LSQQuantizer(4, kind="act", per_channel=True)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("name", ["lsq", "lsq_tensor", "lsq_nopost", "lsq_nopost_fixed"])
def test_quantize_model_with_lsq_trains_one_step_and_round_trips(name):
    torch.manual_seed(6)
    model = quantize_model(
        Tiny(), QuantConfig(weight_bits=3, act_bits=3, weight_quantizer=name, act_quantizer=name)
    )
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    count_bitops(model, (1, 6, 6))  # a shape-only pass must not initialise the steps
    assert all(q._n == 0 for q in model.modules() if isinstance(q, LSQQuantizer))
    set_quant_state(model, enabled=True, update_ranges=True)
    with torch.no_grad():
        model(x)
    set_quant_state(model, update_ranges=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = copy.deepcopy(model.state_dict())
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    scales = [q.scale for q in model.modules() if isinstance(q, LSQQuantizer)]
    assert len(scales) == 3 and all(s.grad is not None and float(s.grad.abs().sum()) > 0 for s in scales)
    opt.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert not torch.equal(before["conv.weight"], after["conv.weight"])
    assert not torch.equal(before["conv.weight_quantizer.scale"], after["conv.weight_quantizer.scale"])
    # a checkpoint loads into a freshly quantized model (steps are resized from the checkpoint)
    fresh = quantize_model(
        Tiny(), QuantConfig(weight_bits=3, act_bits=3, weight_quantizer=name, act_quantizer=name)
    )
    fresh.load_state_dict(after)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert all(m.weight_quantizer._n == 1 for _, m in quant_layers(fresh))
