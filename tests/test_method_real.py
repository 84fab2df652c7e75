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


def test_talr_reports_its_summed_lr_and_the_matched_control_gets_the_same_per_layer():
    from zsqpipe.engine import make_optimizer, make_scheduler
    from zsqpipe.methods.real import RealConfig, matched_latent_groups

    ctx, _ = make_ctx()
    run_real(ctx, talr={})
    ref = ctx.summary
    sums = ref["talr"]["lr_sum"]
    assert set(sums) == {"0", "3", "8"} and all(v > 0 for v in sums.values())  # both convs and the head
    assert ref["latent"]["lr_sum_mean"] == pytest.approx(sum(sums.values()) / len(sums))

    # the control's groups: under its cosine schedule each layer's LR adds up to TALR's sum of U for that layer
    control, _ = make_ctx()
    cfg = RealConfig(epochs=2, iters_per_epoch=5, lr=0.01, latent_lr_from="lsq_talr")
    groups, factor = matched_latent_groups(control.student, ref, cfg, 10)
    opt = make_optimizer(groups, "sgd", 0.01, 0.9, 0.0, True)
    sched = make_scheduler(opt, "cosine", 10)  # latent_schedule null: the latent groups follow `schedule`
    applied = [0.0] * len(opt.param_groups)
    for _ in range(10):
        for i, g in enumerate(opt.param_groups):
            applied[i] += g["lr"]
        opt.step()
        sched.step()
    latent = {g["talr_layers"][0]: a for g, a in zip(opt.param_groups, applied, strict=True) if "talr_layers" in g}
    assert latent == pytest.approx(sums)
    assert applied[-1] == pytest.approx(0.01 * 5.5)  # the rest keeps lr under its cosine (sum_t<10 of factors 5.5)

    # the method end to end: frozen weight step sizes, the matched sums in its summary
    control.lr_reference = ref
    run_real(control, latent_lr_from="lsq_talr", freeze_weight_scales=True)
    assert control.summary["latent"]["lr_sum"] == pytest.approx(sums)
    assert control.summary["latent"]["matched_to"] == "lsq_talr"
    w_scales = [m.weight_quantizer.scale for m in control.student.modules() if hasattr(m, "weight_quantizer")]
    assert w_scales and all(not s.requires_grad for s in w_scales)

    plain, _ = make_ctx()
    run_real(plain, schedule="constant")
    assert plain.summary["latent"]["lr_sum_mean"] == pytest.approx(0.01 * 10)

    # latent_schedule: the matched latent weights spread the same sum evenly, every other parameter keeps cosine
    cfg = RealConfig(epochs=2, iters_per_epoch=5, lr=0.01, latent_lr_from="lsq_talr", latent_schedule="constant")
    groups, factor = matched_latent_groups(make_ctx()[0].student, ref, cfg, 10)
    is_latent = ["talr_layers" in g for g in groups]
    opt = make_optimizer(groups, "sgd", 0.01, 0.9, 0.0, True)
    sched = make_scheduler(opt, "cosine", 10, group_factors={i: factor for i, lat in enumerate(is_latent) if lat})
    seen = [[] for _ in groups]
    for _ in range(10):
        for i, g in enumerate(opt.param_groups):
            seen[i].append(g["lr"])
        opt.step()
        sched.step()
    for lrs, lat, g in zip(seen, is_latent, opt.param_groups, strict=True):
        if lat:
            assert lrs == pytest.approx([sums[g["talr_layers"][0]] / 10] * 10)  # constant, same sum
        else:
            assert lrs[0] == pytest.approx(0.01) and lrs[-1] < 0.001  # cosine


def test_matched_control_errors():
    from zsqpipe.methods.real import RealConfig, matched_latent_groups

    with pytest.raises(ConfigError, match="latent_lr_from: a TALR run"):
        RealConfig(talr={}, latent_lr_from="lsq_talr")
    ctx, _ = make_ctx()
    cfg = RealConfig(latent_lr_from="lsq_talr")
    with pytest.raises(ConfigError, match="needs that cell's history.json"):
        matched_latent_groups(ctx.student, None, cfg, 10)
    with pytest.raises(ConfigError, match="not this model's quantized layers"):
        matched_latent_groups(ctx.student, {"talr": {"steps": 10, "lr_sum": {"global": 1.0}}}, cfg, 10)
    with pytest.raises(ConfigError, match="reference TALR run trained 200 steps, this run 10"):
        matched_latent_groups(ctx.student, {"talr": {"steps": 200, "lr_sum": {}}}, cfg, 10)
    with pytest.raises(ConfigError, match="latent_schedule: the LR-matched control needs cosine"):
        RealConfig(latent_lr_from="lsq_talr", schedule="onecycle")
