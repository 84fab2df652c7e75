"""IntraQ: soft-target and cosine-margin losses, BN loss, batched RRC, synthesis without real data, end-to-end."""

import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import shard_context
from torch import nn

from zsqpipe.data import forbid_real_data
from zsqpipe.errors import ConfigError
from zsqpipe.methods.intraq import IntraQ
from zsqpipe.models import create_model
from zsqpipe.zsq.augment import random_resized_crop_flip, resized_crop, rrc_params
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.synth_intraq import (
    IntraQSynthConfig,
    classifier_input_hook,
    cosine_margin_losses,
    soft_targets,
    synthesize_intraq,
    target_loss,
)
from zsqpipe.zsq.synthesis import SynthContext


def tiny_net(channels=1, classes=3):
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    ).eval()  # fmt: skip


def test_target_loss_matches_hand_computed_value():
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # softmax: (0.6, 0.2, 0.2), 1/3 each
    labels = torch.tensor([0, 2])
    targets = torch.tensor([0.95, 1.0])
    expected = ((0.6 - 0.95) ** 2 + (1 / 3 - 1.0) ** 2) / 2
    assert float(target_loss(logits, labels, targets)) == pytest.approx(expected, rel=1e-6)


def test_cosine_margin_losses_match_hand_computed_values():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    centers = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # d = 1 - cos = 0, 1, 1 + 1/sqrt(2)
    mask = torch.tensor([1.0, 1.0, 0.0])  # the third sample's class has no centre yet
    lower, upper = cosine_margin_losses(f, centers, mask, eps_lower=0.05, eps_upper=0.8)
    assert float(lower) == pytest.approx(0.05 / (2 + 1e-6), rel=1e-5)  # relu(0.05 - 0) only
    assert float(upper) == pytest.approx(0.2 / (2 + 1e-6), rel=1e-5)  # relu(1 - 0.8) only
    lower, upper = cosine_margin_losses(f, centers, torch.zeros(3), 0.05, 0.8)
    assert float(lower) == 0.0 and float(upper) == 0.0


def test_soft_targets():
    t = soft_targets(200, 0.95, 0.5, torch.Generator().manual_seed(0))
    assert bool(((t >= 0.95) & (t <= 1.0)).all())
    hard = int((t == 1.0).sum())
    assert 60 < hard < 140  # about half keep the hard target 1


def test_batch_bn_loss_is_zero_when_running_stats_equal_the_batch_stats():
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    stats = BNStatistics(nn.Sequential(bn))
    bn(x)
    assert float(stats.batch_loss()) == pytest.approx(0.0, abs=1e-10)
    stats.remove()


def test_rrc_full_scale_is_identity_or_flip():
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    out = random_resized_crop_flip(x, (1.0, 1.0), torch.Generator().manual_seed(0))
    for i in range(8):  # ratio may still reject the box; the fallback is the whole image too
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(out[i], x[i].flip(-1), atol=1e-5)


def test_resized_crop_equals_interpolate_of_the_crop_and_is_differentiable():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    top, left, h, w = (
        torch.tensor([1.0, 0.0]),
        torch.tensor([2.0, 3.0]),
        torch.tensor([5.0, 8.0]),
        torch.tensor([4.0, 5.0]),
    )
    out = resized_crop(x, top, left, h, w, flip=torch.tensor([False, True]))
    ref0 = F.interpolate(x[0:1, :, 1:6, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    ref1 = F.interpolate(x[1:2, :, 0:8, 3:8], size=(8, 8), mode="bilinear", align_corners=False).flip(-1)
    assert torch.allclose(out[0:1], ref0, atol=1e-5) and torch.allclose(out[1:2], ref1, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_rrc_params_respect_scale_and_image():
    top, left, h, w = rrc_params(500, 32, 32, (0.5, 1.0), torch.Generator().manual_seed(0))
    area = h * w / (32 * 32)
    assert bool((area >= 0.45).all()) and bool((area <= 1.0).all())
    assert bool((top >= 0).all() & (top + h <= 32).all() & (left >= 0).all() & (left + w <= 32).all())


def test_classifier_input_hook_takes_the_pooled_feature():
    model = create_model("resnet20", 10, 1, 8).eval()
    store, handle = classifier_input_hook(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
        assert torch.allclose(store["f"], model.features(x).flatten(1))
    handle.remove()


def test_synthesis_reads_no_real_data_uses_class_centres_and_is_repeatable():
    teacher = tiny_net()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = IntraQSynthConfig(num_samples=10, batch_size=4, iters=3, aug_prob=0.5)
    logs = []

    def run():
        ctx = SynthContext(3, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), logs.append)
        with forbid_real_data("test"):
            return synthesize_intraq(teacher, cfg, ctx)

    images, labels = run()
    assert images.shape == (10, 1, 8, 8) and labels.shape == (10,)
    assert int(labels.min()) >= 0 and int(labels.max()) < 3
    assert "0 with a class centre" in logs[0] and "0 with a class centre" not in logs[2]
    images2, labels2 = run()
    assert torch.equal(images, images2) and torch.equal(labels, labels2)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


make_ctx = shard_context


@pytest.mark.parametrize("calibration", ["shards", "generator"])
def test_intraq_end_to_end(tmp_path, calibration):
    ctx, history = make_ctx(tmp_path)
    before = {k: v.clone() for k, v in ctx.student.state_dict().items() if "weight" in k}
    cfg = {
        "calibration": calibration, "calib_batches": 1, "generator_steps": 2, "generator_batch_size": 4,
        "epochs": 1, "iters_per_epoch": 2, "batch_size": 4, "lr": 1e-3,
    }  # fmt: skip
    IntraQ(cfg).run(ctx)
    assert [e for e, _ in history] == [0] and math.isfinite(history[0][1]["train_loss"])
    quant = [m for m in ctx.student.modules() if hasattr(m, "ema_mode")]
    assert quant and not any(q.update_ranges for q in quant)
    after = ctx.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in ctx.teacher.modules())  # generator-step BN hooks removed


def test_intraq_rejects_unknown_calibration(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    with pytest.raises(ConfigError):
        IntraQ({"calibration": "real"}).run(ctx)
