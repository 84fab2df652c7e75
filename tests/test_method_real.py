"""The `real` method with the QAT techniques of issue 5: LSQ quantizers, TALR and LBT gradient quantization."""


import pytest
import torch
from method_helpers import quant_context
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.methods import get_method
from zsqpipe.quant import QuantConfig


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def make_ctx(weight_quantizer="lsq", act_quantizer="lsq", seed=0):
    qcfg = QuantConfig(weight_bits=3, act_bits=3, weight_quantizer=weight_quantizer, act_quantizer=act_quantizer)
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    def loader(batch_size, loader_seed, augment=True):
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(loader_seed))
        return [
            (images[perm[i : i + batch_size]], labels[perm[i : i + batch_size]])
            for i in range(0, 64, batch_size)
        ]

    history = []
    ctx, _ = quant_context(small_cnn, seed=seed, quant=qcfg, train_loader_factory=loader,
                           end_epoch=lambda epoch, extra: history.append((epoch, extra)) or {})  # fmt: skip
    return ctx, history


def run_real(ctx, **cfg):
    base = {"epochs": 2, "iters_per_epoch": 5, "batch_size": 16, "calib_batches": 2, "lr": 0.01}
    get_method("real")({**base, **cfg}).run(ctx)


def test_real_with_lsq_talr_and_grad_quant_trains_and_logs():
    ctx, history = make_ctx()
    before = {k: v.clone() for k, v in ctx.student.state_dict().items()}
    run_real(ctx, talr={"scope": "layer"}, grad_quant={"bits": 4, "interval": "adaptive"})
    assert [e for e, _ in history] == [0, 1]
    last = history[-1][1]
    assert last["talr_U_mean"] >= 0.0 and 0.0 <= last["talr_k_mean"] <= 1.0
    assert 0.0 < last["grad_gamma_mean"] <= 1.0
    after = ctx.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    # TALR froze the weight quantizers' step sizes (the paper does), activation step sizes still train
    w_scales = [m.weight_quantizer.scale for m in ctx.student.modules() if hasattr(m, "weight_quantizer")]
    assert w_scales and all(not s.requires_grad for s in w_scales)
    # the gradient hooks are removed at the end: a plain backward afterwards is not quantized
    assert not any(m._forward_hooks for m in ctx.student.modules() if isinstance(m, nn.Conv2d))


def test_talr_changes_the_result_and_is_deterministic():
    results = []
    for talr in (None, {}, {}):
        ctx, _ = make_ctx()
        run_real(ctx, talr=talr)
        results.append(torch.cat([p.detach().flatten() for p in ctx.student.parameters()]))
    assert not torch.equal(results[0], results[1])
    assert torch.equal(results[1], results[2])


def test_grad_quant_minmax_differs_from_fp_gradients():
    out = []
    for gq in (None, {"bits": 4, "interval": "minmax"}):
        ctx, _ = make_ctx(weight_quantizer="minmax_channel", act_quantizer="ema_minmax")
        run_real(ctx, grad_quant=gq)
        out.append(torch.cat([p.detach().flatten() for p in ctx.student.parameters()]))
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "cfg, key",
    [({"talr": {"bogus": 1}}, "methods.real.talr.bogus"), ({"grad_quant": {"bits": 1}}, "grad_quant.bits"),
     ({"talr": {"scope": "model"}}, "talr.scope")],
)  # fmt: skip
def test_bad_technique_settings_fail_at_construction(cfg, key):
    with pytest.raises(ConfigError, match=key):
        get_method("real")(cfg)
