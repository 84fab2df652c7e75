"""HAST: hard-sample synthesis loss, channel-attention feature alignment, FGSM promotion, end-to-end run."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import quant_context
from torch import nn

from zsqpipe.data import forbid_real_data, load_dataset
from zsqpipe.data.shards import ShardSet, write_shards
from zsqpipe.errors import ConfigError, DataError
from zsqpipe.methods.hast import (
    HAST,
    FeatureHooks,
    attention_loss,
    channel_attention,
    difficulty,
    feature_points,
    fgsm_step,
)
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model
from zsqpipe.quant.quantizers import EMAMinMaxQuantizer
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.synth_hast import HASTSynthConfig, hard_sample_ce, hast_synthesis_loss, synthesize_hast
from zsqpipe.zsq.synthesis import SynthContext


def tiny_net(num_classes=3, channels=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    ).eval()


# ------------------------------------------------------------------------------------ synthesis loss


def test_hard_sample_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p0 = math.exp(2) / (math.exp(2) + 2)  # label 0 of row 0
    p1 = 1 / (math.e + 2)  # label 2 of row 1
    expected = ((1 - p0) ** 2 * -math.log(p0) + (1 - p1) ** 2 * -math.log(p1)) / 2
    assert hard_sample_ce(logits, labels, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # gamma = 0 (hard_sample off) is the plain CE
    assert hard_sample_ce(logits, labels, 0.0).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    # p is not detached: the gradient differs from the one with a constant difficulty weight
    lg = logits.clone().requires_grad_(True)
    hard_sample_ce(lg, labels, 2.0).backward()
    lc = logits.clone().requires_grad_(True)
    w = (1 - F.softmax(lc, 1).gather(1, labels[:, None]).squeeze(1)).detach() ** 2
    (w * F.cross_entropy(lc, labels, reduction="none")).mean().backward()
    assert not torch.allclose(lg.grad, lc.grad)
    assert torch.autograd.gradcheck(
        lambda z: hard_sample_ce(z, labels, 2.0), (logits.double().requires_grad_(True),)
    )


def test_hard_sample_ce_no_nan_for_fractional_gamma_at_p_one():
    logits = torch.tensor([[200.0, 0.0]], requires_grad=True)  # p rounds to 1
    hard_sample_ce(logits, torch.tensor([0]), 0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_synthesis_loss_bn_term_vanishes_when_statistics_match():
    net = tiny_net()
    x = torch.randn(6, 1, 5, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        h = net[0](x)
        net[1].running_mean.copy_(h.mean((0, 2, 3)))
        net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    bn = BNStatistics(net)
    try:
        cfg = HASTSynthConfig(beta=10.0, gamma=2.0)
        loss = hast_synthesis_loss(net, bn, x, y, cfg)
        assert bn.batch_loss().item() == pytest.approx(0.0, abs=1e-10)
        assert loss.item() == pytest.approx(10.0 * hard_sample_ce(net(x), y, 2.0).item(), rel=1e-6)
        off = hast_synthesis_loss(net, bn, x, y, HASTSynthConfig(hard_sample=False))
        assert off.item() == pytest.approx(10.0 * F.cross_entropy(net(x), y).item(), rel=1e-6)
        # statistics that differ give a positive BN term, added unweighted
        parts: dict[str, float] = {}
        loss2 = hast_synthesis_loss(net, bn, x * 3, y, cfg, parts)
        assert bn.batch_loss().item() > 0 and parts["bn"] == pytest.approx(bn.batch_loss().item())
        assert loss2.item() == pytest.approx(
            10.0 * hard_sample_ce(net(x * 3), y, 2.0).item() + bn.batch_loss().item(), rel=1e-6
        )
    finally:
        bn.remove()


def test_synthesis_reads_no_real_data_and_optimises():
    net = tiny_net(num_classes=4)
    for p in net.parameters():
        p.requires_grad_(False)
    cfg = HASTSynthConfig(num_samples=10, batch_size=4, iters=3, patience=1)
    ctx = SynthContext(
        4, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None
    )
    with forbid_real_data("hast synthesis test"):
        with pytest.raises(DataError):
            load_dataset("fashion_mnist", "train")  # the guard is active
        images, labels = synthesize_hast(net, cfg, ctx)
    assert images.shape == (10, 1, 8, 8) and labels.shape == (10,)
    assert labels.min() >= 0 and labels.max() < 4 and torch.isfinite(images).all()
    assert [len(t) for t in ctx.bn_traces] == [1, 1, 1]  # 3 batches, one 3-step block of the BN term each
    ctx0 = SynthContext(
        4, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None
    )
    init, labels0 = synthesize_hast(net, HASTSynthConfig(num_samples=10, batch_size=4, iters=0), ctx0)
    assert torch.equal(labels, labels0) and not torch.allclose(images, init)  # the pixels were optimised
    assert not any(m._forward_hooks for m in net.modules())  # BN hooks removed
    # same seed, same samples
    ctx2 = SynthContext(
        4, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None
    )
    images2, labels2 = synthesize_hast(net, cfg, ctx2)
    assert torch.equal(images, images2) and torch.equal(labels, labels2)


# --------------------------------------------------------------------------- feature alignment, FGSM


def test_channel_attention_loss_hand_computed():
    fs = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2): mean f^2 per channel = [1, 2]
    ft = torch.tensor([[[[0.0, 0.0]], [[1.0, -1.0]]]])  # [0, 1]
    a_s = torch.tensor([[1.0, 2.0]]) / math.sqrt(5)
    assert torch.allclose(channel_attention(fs), a_s)
    assert torch.allclose(channel_attention(ft), torch.tensor([[0.0, 1.0]]))
    expected = ((1 / math.sqrt(5)) ** 2 + (2 / math.sqrt(5) - 1) ** 2) / 2
    assert attention_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-6)
    # summed over layers, zero for identical features, invariant to the scale of a feature map
    assert attention_loss([fs, fs], [ft, ft]).item() == pytest.approx(2 * expected, rel=1e-6)
    assert attention_loss([fs], [3 * fs]).item() == pytest.approx(0.0, abs=1e-12)


def test_fgsm_moves_inputs_in_the_sign_of_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(2, 1, 4, 4)
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    objective = (w * x).sum() + 0.5 * (x**2).sum()
    x_adv = fgsm_step(objective, x, 0.01)
    grad = w + x.detach()
    assert torch.allclose(x_adv - x.detach(), 0.01 * grad.sign())
    assert not x_adv.requires_grad
    with torch.no_grad():
        assert (w * x_adv).sum() + 0.5 * (x_adv**2).sum() > objective  # the objective went up
    objective.backward()  # the graph is kept for the training loss

    # the paper's objective: the difficulty 1 - p under a (quantized) model increases
    net = tiny_net()
    xb = torch.randn(4, 1, 6, 6, requires_grad=True)
    yb = torch.tensor([0, 1, 2, 0])
    d = difficulty(net(xb), yb)
    (g,) = torch.autograd.grad(d, xb, retain_graph=True)
    xb_adv = fgsm_step(d, xb, 1e-3)
    assert torch.equal(xb_adv - xb.detach(), (xb.detach() + 1e-3 * g.sign()) - xb.detach())
    with torch.no_grad():
        assert difficulty(net(xb_adv), yb) > d


def test_feature_points_per_architecture():
    r20 = create_model("resnet20", 10, 1, 28)
    names = feature_points(r20)
    assert len(names) == 9 and all(n.endswith(".body") for n in names)
    student = quantize_model(copy.deepcopy(r20), QuantConfig(weight_bits=4, act_bits=4))
    assert feature_points(student) == names  # the quantized copy keeps the names
    r18 = create_model("resnet18", 10, 3, 32)
    names18 = feature_points(r18)
    assert len(names18) == 8 and all(n.endswith(".bn2") for n in names18)
    mv2 = create_model("mobilenet_v2", 10, 3, 32)
    names_mv2 = feature_points(mv2)
    modules = dict(mv2.named_modules())
    assert len(names_mv2) == 17 and all(isinstance(modules[n], nn.BatchNorm2d) for n in names_mv2)
    hooks = FeatureHooks(r20, names)
    r20.eval()(torch.randn(2, 1, 28, 28))
    feats = hooks.take()
    hooks.remove()
    assert [f.shape[1] for f in feats] == [16] * 3 + [32] * 3 + [64] * 3
    assert hooks.outputs == [None] * 9 and not any(m._forward_hooks for m in r20.modules())


def test_bottleneck_feature_is_the_residual_branch_not_the_block_output():
    """torchvision's Bottleneck adds the shortcut to bn3's output in place; the hook must keep bn3's output."""
    from torchvision.models.resnet import Bottleneck

    block = nn.Sequential(Bottleneck(16, 4)).eval()
    names = feature_points(block)
    assert names == ["0.bn3"]
    branch = []
    block[0].bn3.register_forward_hook(lambda _m, _i, out: branch.append(out.clone()))
    hooks = FeatureHooks(block, names)
    x = torch.randn(2, 16, 6, 6)
    out = block(x)
    (feat,) = hooks.take()
    hooks.remove()
    assert torch.equal(feat, branch[0]) and not torch.equal(feat, out)


def test_config_rejects_unknown_fgsm_objective():
    with pytest.raises(ConfigError, match="fgsm_objective"):
        HAST({"fgsm_objective": "pgd"})
    with pytest.raises(ConfigError, match="unknown key"):
        HAST({"lam": 1.0})
    with pytest.raises(ConfigError, match=r"methods\.hast\.augment: True is not one of \['rrc', 'crop_flip', 'none'\]"):
        HAST({"augment": True})  # the boolean of the pre-issue-13 config
    with pytest.raises(ConfigError, match=r"methods\.hast\.augment: 'pad' is not one of \['rrc', 'crop_flip', 'none'\]"):
        HAST({"augment": "pad"})


def test_miniature_defaults_follow_the_budget_rule():
    """docs/budget.md: HAST takes the `real` step (kd_alpha * lr = 0.005, as ZeroQ/IntraQ), the official
    RandomResizedCrop(0.5, 1) + flip, and 200 calibration steps; the paper configs keep lr 1e-5."""
    c = HAST({}).cfg
    assert math.isclose(c.kd_alpha * c.lr, 0.005) and (c.augment, c.aug_margin, c.calib_iters) == ("rrc", 0.5, 200)


def test_intraq_and_hast_share_the_official_generator_calibration_budget():
    """docs/budget.md: IntraQ and HAST both calibrate ranges with the official GDFQ-generator epochs, at the same
    step count and batch (no method gets a calibration the other is denied)."""
    from zsqpipe.methods.intraq import IntraQ

    h, i = HAST({}).cfg, IntraQ({}).cfg
    assert i.calibration == "generator"
    assert (i.generator_steps, i.generator_batch_size, i.generator_lr, i.bns_weight) == (
        h.calib_iters, h.calib_batch_size, h.generator_lr, h.generator_bns_weight
    )


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_context(tmp_path):
    ctx, history = quant_context()  # seeded tiny ResNet-20 (8x8 inputs keep the run tiny), W4A4 student
    images, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    write_shards(tmp_path / "samples", images, labels, torch.rand(12), "hast", 0, shard_size=8)
    ctx.samples = ShardSet.open(tmp_path / "samples" / "manifest.json")
    return ctx, history


TINY = {
    "epochs": 1,
    "iters_per_epoch": 2,
    "batch_size": 4,
    "calib_iters": 2,
    "calib_batch_size": 4,
    "lr": 1e-3,
}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"fgsm_objective": "kd_fa", "ce_weight": 1.0},
        {"difficulty_promotion": False, "feature_alignment": False},
        {"augment": "crop_flip"},
        {"augment": "none"},
    ],
)
def test_end_to_end_run(tiny_context, options):
    ctx, history = tiny_context
    teacher_before = copy.deepcopy(ctx.teacher.state_dict())
    student_before = copy.deepcopy(ctx.student.state_dict())
    with forbid_real_data("hast end-to-end test"):
        HAST({**TINY, **options}).run(ctx)
    assert [h["epoch"] for h in history] == [0] and math.isfinite(history[0]["train_loss"])
    assert history[0]["train_loss"] > 0
    acts = [m for m in ctx.student.modules() if isinstance(m, EMAMinMaxQuantizer)]
    assert acts and all(not q.update_ranges and q.num_updates.item() == 2 for q in acts)  # calibrated, frozen
    assert all(torch.equal(v, teacher_before[k]) for k, v in ctx.teacher.state_dict().items())
    changed = [k for k, v in ctx.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert not any(m._forward_hooks for m in [*ctx.teacher.modules(), *ctx.student.modules()])
    assert not ctx.student.training  # trained in eval mode (bn_train false)
