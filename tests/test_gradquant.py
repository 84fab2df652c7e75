"""LBT gradient quantization: stochastic rounding, the clipping interval and its adaptive update."""

import math

import pytest
import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.gradquant import (
    GradQuantConfig,
    enable_grad_quant,
    quantize_grad,
    search_initial_gamma,
)
from zsqpipe.quant import QuantConfig, quantize_model


def observed_output_grad(layer: nn.Linear, grad: torch.Tensor) -> torch.Tensor:
    """Backpropagate dL/dy = ``grad`` through ``layer`` fed with the identity, so weight.grad = G_hat^T."""
    layer.weight.grad = None
    y = layer(torch.eye(layer.in_features))
    (y * grad).sum().backward()
    return layer.weight.grad.t().clone()


def test_stochastic_rounding_is_unbiased_and_on_the_grid():
    torch.manual_seed(0)
    bits, clip = 4, torch.tensor(1.0)
    delta = 2 * 1.0 / (2**bits - 2)
    g = torch.linspace(-0.99, 0.99, 41)
    n = 20000
    q = quantize_grad(g.expand(n, -1).clone(), bits, clip)
    levels = (q + 1.0) / delta
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the 2^b - 1 symmetric levels
    assert levels.round().unique().numel() <= 2**bits - 1 and q.abs().max() <= 1.0 + 1e-6
    # each value rounds to one of its two neighbours: variance <= delta^2 / 4, so the mean over n draws is
    # within 5 standard errors (delta / (2 sqrt(n))) of the input
    err = (q.mean(0) - g).abs()
    assert err.max() < 5 * delta / (2 * math.sqrt(n))
    assert ((q - g).abs() < delta + 1e-6).all()
    # deterministic rounding would be biased: check the test could see it
    det = torch.round((g + 1) / delta) * delta - 1
    assert (det - g).abs().max() > 5 * delta / (2 * math.sqrt(n))


def test_values_outside_the_interval_are_clipped():
    g = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0])
    q = quantize_grad(g.clone(), 2, torch.tensor(1.0))  # levels -1, 0, 1
    assert q[0] == -1.0 and q[-1] == 1.0 and q[2] == 0.0
    assert torch.equal(quantize_grad(torch.zeros(5), 4, torch.tensor(0.0)), torch.zeros(5))


def test_minmax_interval_and_fp_baselines():
    torch.manual_seed(1)
    lin = nn.Linear(6, 50, bias=False)
    g = torch.randn(6, 50)
    fp = observed_output_grad(lin, g)
    assert torch.allclose(fp, g)
    for bits in (None, 32):  # FP gradients: nothing installed
        h = enable_grad_quant(lin, GradQuantConfig(bits=bits))
        assert h.layers == {} and torch.allclose(observed_output_grad(lin, g), g)
        h.update_intervals()
    h = enable_grad_quant(lin, GradQuantConfig(bits=4, interval="minmax"))
    q = observed_output_grad(lin, g)
    c = g.abs().max()
    levels = (q + c) / (2 * c / 14)
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert q.abs().max() <= c + 1e-6 and not torch.allclose(q, g)
    h.update_intervals()
    assert h.gammas() == {"": 1.0}
    h.remove()
    assert torch.allclose(observed_output_grad(lin, g), g)


def test_interval_update_moves_toward_the_target_and_converges():
    torch.manual_seed(2)
    lin = nn.Linear(4, 1000, bias=False)
    g = torch.distributions.Laplace(0.0, 1.0).sample((4, 1000))
    cfg = GradQuantConfig(bits=4, alpha=0.15, search_init=False, gamma=0.75)  # target = 0.01
    target = cfg.target_ratio
    assert target == pytest.approx(0.01)
    a = g.abs().flatten()
    ratio = lambda gam: float((a > gam * a.max()).float().mean())  # noqa: E731
    gamma_star = float(a.sort().values[int(round((1 - target) * a.numel())) - 1] / a.max())
    h = enable_grad_quant(lin, cfg)
    history = []
    for _ in range(400):
        observed_output_grad(lin, g)
        h.update_intervals()
        history.append(h.gammas()[""])
    assert ratio(0.75) < target and history[0] == pytest.approx(0.75 - 1e-3)  # the interval narrows
    assert all(b <= a for a, b in zip(history[:100], history[1:100], strict=False))
    final = history[-1]
    assert abs(final - gamma_star) < 3e-3
    assert ratio(final - 2e-3) > target > ratio(final + 2e-3)  # oscillates around R = target
    # from below (too many clipped gradients) the interval widens
    h.remove()
    h = enable_grad_quant(lin, GradQuantConfig(bits=4, alpha=0.15, search_init=False, gamma=0.1))
    observed_output_grad(lin, g)
    h.update_intervals()
    assert h.gammas()[""] == pytest.approx(0.101)


def official_init(grad: torch.Tensor, target: float) -> float:
    """``train.py: update_interval`` init branch of the official LBT code, transcribed."""
    moment, clip_ratio, moment_ratio, threshold = 0.999, torch.tensor(1.0), torch.tensor(0.0), 0
    grad_max = grad.abs().max()
    while threshold <= 0:
        r = (grad.abs() > grad_max * clip_ratio).float().mean()
        moment_ratio = moment * moment_ratio + (1 - moment) * r
        threshold = torch.sign(moment_ratio - target)
        clip_ratio = clip_ratio + (1 - moment) * threshold
    return float(torch.clamp(clip_ratio, min=0.001, max=1))


@pytest.mark.parametrize("alpha", [1e-3, 0.05])
def test_initial_search_matches_the_official_loop(alpha):
    torch.manual_seed(3)
    g = torch.randn(2000) ** 3
    target = alpha / 15
    assert search_initial_gamma(g.abs(), target) == pytest.approx(official_init(g, target), abs=1e-4)


def test_first_update_runs_the_search_then_steps():
    torch.manual_seed(4)
    lin = nn.Linear(3, 400, bias=False)
    g = torch.randn(3, 400) ** 3
    h = enable_grad_quant(lin, GradQuantConfig(bits=4))
    observed_output_grad(lin, g)
    h.update_intervals()
    g0 = h.gammas()[""]
    assert g0 == pytest.approx(official_init(g, 1e-3 / 15), abs=1e-4) and g0 < 1.0
    q = observed_output_grad(lin, g)
    assert q.abs().max() <= g0 * g.abs().max() * (1 + 1e-5)  # the interval is now clipped
    h.update_intervals()
    assert abs(h.gammas()[""] - g0) == pytest.approx(1e-3)


def test_zero_gradient_stays_zero_and_keeps_the_interval():
    lin = nn.Linear(3, 4, bias=False)
    h = enable_grad_quant(lin, GradQuantConfig(bits=4, search_init=False, gamma=0.5))
    q = observed_output_grad(lin, torch.zeros(3, 4))
    assert torch.equal(q, torch.zeros(4, 3).t())
    h.update_intervals()
    assert h.gammas()[""] == 0.5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_layer_selection_quantized_fp_and_named():
    cfg = GradQuantConfig(bits=4)
    assert set(enable_grad_quant(Net(), cfg).layers) == {"conv", "fc"}  # FP model: every Conv/Linear
    q = quantize_model(
        Net(), QuantConfig(weight_bits=4, act_bits=4, act_quantizer="lsq", layer_bits={"fc": 32})
    )
    assert set(enable_grad_quant(q, cfg).layers) == {"conv"}  # only layers with an active weight quantizer
    assert set(enable_grad_quant(q, cfg, layers=["fc"]).layers) == {"fc"}
    with pytest.raises(ConfigError, match="relu"):
        enable_grad_quant(q, cfg, layers=["relu"])
    # a quantized model trains with 4-bit gradients; under no_grad nothing is hooked
    torch.manual_seed(5)
    h = enable_grad_quant(q, cfg)
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        assert q(x).grad_fn is None
    nn.functional.cross_entropy(q(x), torch.tensor([0, 1, 0, 1])).backward()
    h.update_intervals()
    assert q.conv.weight.grad is not None and torch.isfinite(q.conv.weight.grad).all()
    assert 0 < h.gammas()["conv"] <= 1


def test_config_validation_and_round_trip():
    cfg = GradQuantConfig(bits=4, interval="fixed", gamma=0.8)
    assert GradQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.target_ratio == pytest.approx(1e-3 / 15)
    with pytest.raises(ConfigError, match="grad_quant.bits"):
        GradQuantConfig(bits=1)
    with pytest.raises(ConfigError, match="grad_quant.interval"):
        GradQuantConfig(bits=4, interval="ema")
    with pytest.raises(ConfigError, match="grad_quant.bogus"):
        GradQuantConfig.from_dict({"bogus": 1})
    lin = nn.Linear(2, 30, bias=False)
    h = enable_grad_quant(lin, cfg)  # fixed interval: gamma stays
    g = torch.randn(2, 30)
    q = observed_output_grad(lin, g)
    h.update_intervals()
    assert h.gammas()[""] == 0.8 and q.abs().max() <= 0.8 * g.abs().max() * (1 + 1e-5)


def test_works_with_an_inplace_relu_after_the_layer():
    torch.manual_seed(6)
    lin = nn.Linear(4, 30, bias=False)
    model = nn.Sequential(lin, nn.ReLU(inplace=True))
    enable_grad_quant(model, GradQuantConfig(bits=3, interval="minmax"), layers=["0"])
    x = torch.eye(4)
    dy = torch.randn(4, 30)
    (model(x) * dy).sum().backward()
    g = dy * (lin(x) > 0)  # the gradient the layer output receives (after the ReLU mask)
    q = lin.weight.grad.t()
    c = g.abs().max()
    levels = (q + c) / (2 * c / 6)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and not torch.allclose(q, g)
