import copy

import pytest
import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.models import create_model
from zsqpipe.quant import (
    QuantAct,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    count_bitops,
    fake_quant_per_tensor,
    model_size_bits,
    quantize_model,
    set_quant_state,
)
from zsqpipe.quant.functional import qparams
from zsqpipe.quant.quantizers import EMAMinMaxQuantizer, EMAMSEQuantizer, MinMaxChannelQuantizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_tensor_matches_pytorch(bits):
    torch.manual_seed(bits)
    x = torch.randn(4, 8, 5, 5) * 2
    lo, hi = torch.tensor(-1.3), torch.tensor(2.1)
    scale, zp = qparams(lo, hi, bits)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 2**bits - 1)
    ours = fake_quant_per_tensor(x, lo, hi, bits)
    assert torch.equal(ours, ref)
    # values lie on the grid s * (k - zp) and within the range
    levels = torch.unique(ours)
    assert len(levels) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_matches_pytorch(bits):
    torch.manual_seed(bits)
    w = torch.randn(6, 3, 3, 3)
    flat = w.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scale, zp = qparams(lo, hi, bits)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, 0, 2**bits - 1)
    ours = MinMaxChannelQuantizer(bits)(w)
    assert torch.equal(ours, ref)


def test_range_without_zero_matches_gdfq_formula():
    """GDFQ's asymmetric quantizer does not force 0 into the range: check against its formula."""
    x = torch.linspace(0.3, 2.0, 50)
    lo, hi, k = x.min(), x.max(), 3
    n = 2**k - 1
    scale = n / (hi - lo)
    zp = torch.round(scale * lo) + 2 ** (k - 1)
    q = torch.clamp(torch.round(scale * x - zp), -(2 ** (k - 1)), 2 ** (k - 1) - 1)
    gdfq = (q + zp) / scale
    ours = fake_quant_per_tensor(x, lo, hi, k)
    assert torch.allclose(ours, gdfq, atol=1e-6)
    assert ours.min() > 0.2  # the grid starts at round(lo / s) * s, near lo, not at 0


def test_identity_ste_passes_gradient_everywhere():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 5.0], requires_grad=True)
    y = fake_quant_per_tensor(x, torch.tensor(-1.0), torch.tensor(1.0), 2, ste="identity")
    y.backward(torch.arange(1.0, 6.0))
    assert torch.equal(x.grad, torch.arange(1.0, 6.0))


def test_clipped_ste_zeroes_gradient_outside_range():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 5.0], requires_grad=True)
    y = fake_quant_per_tensor(x, torch.tensor(-1.0), torch.tensor(1.0), 2, ste="clipped")
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_weight_quantizer_gradient_is_identity():
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    MinMaxChannelQuantizer(3)(w).pow(2).sum().backward()
    wq = MinMaxChannelQuantizer(3)(w.detach())
    assert torch.allclose(w.grad, 2 * wq)


def test_ema_correct_mode():
    q = EMAMinMaxQuantizer(4, momentum=0.9, ema_mode="correct")
    q.update_ranges = True
    q(torch.tensor([0.0, 2.0]))
    assert float(q.x_max) == pytest.approx(2.0)
    q(torch.tensor([0.0, 4.0]))
    assert float(q.x_max) == pytest.approx(0.9 * 2 + 0.1 * 4)


def test_ema_official_mode_reproduces_gdfq_update():
    q = EMAMinMaxQuantizer(4, momentum=0.9, ema_mode="official")
    q.update_ranges = True
    x_max, beta_t = 0.0, 1.0
    for m in [2.0, 4.0, 3.0]:
        q(torch.tensor([0.0, m]))
        beta_t *= 0.9
        x_max = (x_max * 0.9 + m * 0.1) / (1 - beta_t)
        assert float(q.x_max) == pytest.approx(x_max, rel=1e-5)
    assert float(q.x_max) > 4.0  # the documented inflation


def test_ema_mse_batch_range_is_the_mse_optimal_clip():
    """A tensor on the 3-bit grid of [0, 7] keeps its max (zero error); one outlier at 70 is clipped away, the
    chosen clip having a lower quantization MSE than the max and than the other candidates."""
    q = EMAMSEQuantizer(3, grid=100)
    on_grid = torch.arange(8.0).repeat(100)
    lo, hi = q.batch_range(on_grid)
    assert (float(lo), float(hi)) == (0.0, pytest.approx(7.0))
    with_outlier = torch.cat([torch.rand(5000) * 7, torch.tensor([70.0])])
    lo, hi = q.batch_range(with_outlier)
    assert float(lo) < 1e-3 and 4.0 < float(hi) < 10.0

    def mse(c):
        return float(((fake_quant_per_tensor(with_outlier, torch.zeros(()), torch.tensor(c), 3) - with_outlier) ** 2).mean())

    assert mse(float(hi)) < mse(70.0)
    assert mse(float(hi)) <= min(mse(70.0 * k / 100) for k in range(1, 101)) + 1e-6


def test_ema_mse_averages_the_batch_clips_and_samples_channels_last_inputs_alike():
    q = EMAMSEQuantizer(3, momentum=0.9, mse_samples=1000)
    q.update_ranges = True
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 4, 6, 6))
    clips = [float(q.batch_range(b)[1]) for b in (x, 2 * x)]
    q(x)
    q(2 * x)
    assert float(q.x_max) == pytest.approx(0.9 * clips[0] + 0.1 * clips[1])
    assert float(q.x_max) < 0.9 * float(x.max()) + 0.1 * float(2 * x.max())  # clipped below the EMA of maxima
    # a channels_last batch is sampled in NHWC order: the same clip as the NHWC-contiguous tensor
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(q.batch_range(cl)[1], q.batch_range(x.permute(0, 2, 3, 1).contiguous())[1])


def test_ema_mse_is_selectable_in_quant_config():
    model = quantize_model(create_model("resnet20", num_classes=10, in_channels=1, image_size=28),
                           QuantConfig(weight_bits=3, act_bits=3, act_quantizer="ema_mse"))
    acts = [m.quantizer for m in model.modules() if isinstance(m, QuantAct)]
    assert acts and all(isinstance(a, EMAMSEQuantizer) and a.bits == 3 for a in acts)


def test_frozen_ranges_do_not_move_and_uncalibrated_raises():
    q = EMAMinMaxQuantizer(4)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(torch.ones(3))
    q.update_ranges = True
    q(torch.tensor([0.0, 1.0]))
    q.update_ranges = False
    q(torch.tensor([0.0, 100.0]))
    assert float(q.x_max) == pytest.approx(1.0)


def test_quantize_model_structure_and_bits():
    model = create_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    n_conv = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    cfg = QuantConfig(
        weight_bits=4,
        act_bits=3,
        first_layer_bits=8,
        last_layer_bits=8,
        layer_bits={"features.stage2.unit1.body.conv1.conv": 2, "features.stage3.unit3.activ": 5},
    )
    quantize_model(model, cfg)
    qlayers = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    assert len(qlayers) == n_conv and len(acts) == n_relu
    assert model.features.init_block.conv.weight_quantizer.bits == 8
    assert model.output.weight_quantizer.bits == 8
    assert model.features.stage2.unit1.body.conv1.conv.weight_quantizer.bits == 2
    assert model.features.stage1.unit1.body.conv2.conv.weight_quantizer.bits == 4
    assert model.features.stage3.unit3.activ[1].bits == 5
    assert model.features.stage1.unit1.activ[1].bits == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21  # BN kept, not folded


def test_quantized_model_forward_and_fp_state_dict_compat():
    torch.manual_seed(0)
    fp = create_model("resnet20", num_classes=10, in_channels=1, image_size=28).eval()
    q = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=8, act_bits=8))
    # parameter names unchanged: an FP state dict loads into the quantized model's float params
    missing, unexpected = q.load_state_dict(fp.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("x_min", "x_max", "beta_t", "num_updates")) for k in missing)
    x = torch.randn(16, 1, 28, 28)
    set_quant_state(q, update_ranges=True)
    q(x)
    set_quant_state(q, update_ranges=False)
    with torch.no_grad():
        err = (q(x) - fp(x)).abs().max() / fp(x).abs().max()
    assert err < 0.1  # 8-bit is close to FP
    set_quant_state(q, enabled=False)
    with torch.no_grad():
        assert torch.allclose(q(x), fp(x), atol=1e-5)


def test_bad_quant_config_errors():
    with pytest.raises(ConfigError, match="quant.weight_bits"):
        QuantConfig(weight_bits=0)
    with pytest.raises(ConfigError, match="quant.ste"):
        QuantConfig(ste="fancy")
    with pytest.raises(ConfigError, match="quant.bogus"):
        QuantConfig.from_dict({"bogus": 1})
    model = create_model("resnet20", 10, 1, 28)
    with pytest.raises(ConfigError, match="quant.layer_bits.nope"):
        quantize_model(model, QuantConfig(layer_bits={"nope": 4}))


def test_bitops_and_size():
    model = create_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    fp_ops = count_bitops(model, (1, 28, 28))
    fp_macs = sum(o.macs for o in fp_ops)
    assert 25e6 < fp_macs < 40e6  # ResNet-20 at 28x28: ~31M MACs
    assert all(o.weight_bits == 32 and o.act_bits == 32 for o in fp_ops)
    n_params = sum(p.numel() for p in model.parameters())
    assert model_size_bits(model) == 32 * n_params
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))
    ops = {o.name: o for o in count_bitops(model, (1, 28, 28))}
    assert sum(o.macs for o in ops.values()) == fp_macs
    assert ops["features.init_block.conv"].act_bits == 32  # the image is not quantized
    assert ops["features.stage1.unit1.body.conv1.conv"].act_bits == 4
    assert ops["features.stage1.unit1.body.conv2.conv"].act_bits == 4
    assert ops["output"].act_bits == 32  # pooled activations are off the grid
    first = ops["features.init_block.conv"]
    assert first.bitops == first.macs * 4 * 32
    assert model_size_bits(model) < 32 * n_params / 6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fast_fake_quant_paths_are_bit_identical(bits):
    """Scalar clamp bounds (CPU) and in-place evaluation give exactly the values of the plain formula
    s * clamp(round(x * (1/s)), q_lo, q_hi) with tensor bounds, for a window with and without 0."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 8, 7, 7, generator=gen) * 3
    for lo, hi in ((torch.tensor(0.0), torch.tensor(4.1)), (torch.tensor(-1.3), torch.tensor(2.7))):
        scale, zp = qparams(lo, hi, bits)
        ref = torch.mul(x, 1.0 / scale).round_().clamp_(-zp, -zp + 2**bits - 1).mul_(scale)
        assert torch.equal(fake_quant_per_tensor(x, lo, hi, bits), ref)
        with torch.inference_mode():
            y = x.clone()
            out = fake_quant_per_tensor(y, lo, hi, bits, inplace=True)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, ref)


def test_inplace_evaluation_gives_the_training_forward_exactly():
    """A calibrated W4A4 ResNet-20 in eval mode: logits under inference_mode (activations quantized in place)
    equal those of a forward that records autograd, bit for bit."""
    torch.manual_seed(0)
    fp = create_model("resnet20", num_classes=10, in_channels=1, image_size=28)
    model = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=4))
    x = torch.randn(32, 1, 28, 28)
    set_quant_state(model, enabled=True, update_ranges=True)
    with torch.no_grad():
        model(x)
    set_quant_state(model, update_ranges=False)
    model.eval()
    acts = [m.quantizer for m in model.modules() if isinstance(m, QuantAct)]
    assert acts and all(q.inplace_input for q in acts)
    with torch.inference_mode():
        fast = model(x)
    slow = model(x)
    assert slow.requires_grad and torch.equal(fast, slow.detach())
