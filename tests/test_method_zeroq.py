"""ZeroQ: distillation losses, initialisation, synthesis without real data, and a tiny end-to-end run."""

import importlib
import math

import pytest
import torch
from method_helpers import shard_context
from torch import nn

from zsqpipe.data import forbid_real_data
from zsqpipe.methods.zeroq import ZeroQ
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.synth_zeroq import (
    UNIFORM_VARIANCE,
    ZeroQSynthConfig,
    initial_images,
    input_stats_loss,
    optimise_pixels,
    synthesize_zeroq,
)
from zsqpipe.zsq.synthesis import SynthContext, block_drop, convergence, get_synthesizer


def standardised(n, c, h, w, seed=0):
    """Images whose every (image, channel) plane has mean 0 and biased variance 1."""
    z = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    z = z - z.mean(dim=(2, 3), keepdim=True)
    return z / z.var(dim=(2, 3), unbiased=False, keepdim=True).sqrt()


def tiny_net(channels=1, classes=3):
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    ).eval()  # fmt: skip


def test_per_sample_bn_loss_is_zero_when_every_image_matches_the_running_stats():
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    x = mean[None, :, None, None] + std[None, :, None, None] * standardised(3, 2, 5, 5)
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(std**2)
    stats = BNStatistics(nn.Sequential(bn))
    stats.layers[0](x)
    assert float(stats.per_sample_loss()) == pytest.approx(0.0, abs=1e-9)
    bn.running_mean.add_(1.0)  # a mismatch is penalised: 2 channels x 1^2 per image
    assert float(stats.per_sample_loss()) == pytest.approx(2.0, abs=1e-5)
    stats.remove()


def test_zeroq_loss_with_input_term_reaches_zero_for_standard_normal_statistics():
    x = standardised(4, 2, 6, 6)
    model = nn.Sequential(nn.BatchNorm2d(2)).eval()  # running stats (0, 1) = the images' statistics
    stats = BNStatistics(model)
    model(x)
    total = stats.per_sample_loss() + input_stats_loss(x, eps=0.0)
    assert float(total) == pytest.approx(0.0, abs=1e-9)
    stats.remove()


def test_per_sample_and_input_losses_match_hand_computed_values():
    # image 0: constant 1 (mean 1, std 0); image 1: +-1 columns (mean 0, std 1)
    x = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, -1.0], [1.0, -1.0]]]])
    # input term: mean_b (mu_b^2 + (sigma_b - 1)^2) = ((1 + 1) + (0 + 0)) / 2
    assert float(input_stats_loss(x, eps=0.0)) == pytest.approx(1.0)
    # ZeroQ BN term with target (mu, sigma) = (0.5, 2): mean_b ((mu_b - 0.5)^2 + (sigma_b - 2)^2)
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    stats = BNStatistics(nn.Sequential(bn))
    bn(x)
    expected = ((0.25 + 4.0) + (0.25 + 1.0)) / 2
    assert float(stats.per_sample_loss()) == pytest.approx(expected)
    stats.remove()


def test_initialisations():
    gen = torch.Generator().manual_seed(0)
    official = initial_images("zeroq_uniform", (64, 1, 8, 8), gen)
    assert float(official.abs().max()) <= 127.5 / UNIFORM_VARIANCE + 1e-7  # ZeroQ issue #20: ~ +-0.024
    corrected = initial_images("uniform", (64, 1, 8, 8), gen)
    assert float(corrected.var()) == pytest.approx(1.0, abs=0.05)
    assert float(corrected.abs().max()) <= 127.5 / math.sqrt(UNIFORM_VARIANCE) + 1e-6
    assert float(initial_images("gaussian", (64, 1, 8, 8), gen).std()) == pytest.approx(1.0, abs=0.05)


def test_optimise_pixels_descends():
    x, last, _ = optimise_pixels(torch.zeros(2, 1, 2, 2), lambda x, _s: ((x - 1.0) ** 2).sum(), 60, 0.5, 100)
    assert last < 8.0 * 0.05 and float(((x - 1.0) ** 2).sum()) < last + 1e-6


def test_optimise_pixels_traces_block_means_and_convergence_compares_blocks_100_steps_apart():
    trace: list[float] = []
    x0 = torch.zeros(2, 1, 2, 2)
    x, _, _ = optimise_pixels(x0, lambda x, s: (x * 0).sum() + s + 1, 200, 0.5, 100, trace=trace)  # loss = step
    assert trace == [10 * k + 5.5 for k in range(20)]  # mean of steps 1-10, 11-20, ..., 191-200
    assert torch.equal(x, x0)
    conv = convergence([trace, [2 * v for v in trace]], [200, 200])
    assert conv["drop_last_100"] == pytest.approx(1.0 - 105.5 / 5.5) and conv["bn_loss"][0] == trace  # best vs best
    assert convergence([trace[:10]], [100])["drop_last_100"] is None  # no block 100 steps before the last
    assert convergence([trace + [200.0]], [205])["drop_last_100"] is None
    assert convergence([[float("nan")] * 11], [110]) == {"every": 10, "bn_loss": [[None] * 11], "drop_last_100": None}
    short: list[float] = []
    optimise_pixels(x0, lambda x, s: (x * 0).sum() + s, 13, 0.5, 100, trace=short, trace_value=lambda: 2.0)
    assert short == [2.0, 2.0]  # the traced value, not the loss; a 3-step last block


def test_optimise_pixels_stops_once_the_loss_falls_less_than_stop_drop_over_100_steps():
    x0 = torch.zeros(2, 1, 2, 2)
    decay = {}  # loss 100 / (1 + step): block drops over 100 steps shrink as the loss flattens
    for stop_drop in (0.3, 0.1):
        trace: list[float] = []
        _, _, steps = optimise_pixels(x0, lambda x, s: (x * 0).sum() + 100.0 / (1 + s), 2000, 0.5, 100,
                                      trace=trace, stop_drop=stop_drop)  # fmt: skip
        assert steps % 10 == 0 and steps == 10 * len(trace) < 2000
        assert 1 - trace[-1] / trace[-11] < stop_drop <= 1 - trace[-2] / trace[-12]  # the first block below it
        assert block_drop(trace) == pytest.approx(1 - trace[-1] / trace[-11])  # falling: last vs 100 back
        decay[stop_drop] = steps
    assert 110 <= decay[0.3] < decay[0.1]
    rising: list[float] = []  # a loss that rises counts as not falling: stopped at the first check (110 steps)
    assert optimise_pixels(x0, lambda x, s: (x * 0).sum() + s, 2000, 0.5, 100, trace=rising, stop_drop=0.05)[2] == 110
    nan = optimise_pixels(x0, lambda x, s: (x * 0).sum() + float("nan"), 150, 0.5, 100, stop_drop=0.05)
    assert nan[2] == 150  # NaN never stops it; no trace passed: it keeps its own
    assert optimise_pixels(x0, lambda x, s: (x * 0).sum() + 100.0 / (1 + s), 300, 0.5, 100)[2] == 300  # 0: all iters
    spiky: list[float] = []  # a 10-step spike at steps 200-209 of a falling loss: the best block still falls
    _, _, steps_spiky = optimise_pixels(x0, lambda x, s: (x * 0).sum() + 100.0 / (1 + s) * (3 if 200 <= s < 210 else 1),
                                        2000, 0.5, 100, trace=spiky, stop_drop=0.1)  # fmt: skip
    assert steps_spiky == decay[0.1]
    assert convergence([trace], [steps])["drop_last_100"] == pytest.approx(1 - trace[-1] / trace[-11])
    assert convergence([trace], [steps + 5])["drop_last_100"] is None  # a short last block is not measured


def test_synthesis_reads_no_real_data_and_labels_are_teacher_argmax():
    teacher = tiny_net()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cfg = ZeroQSynthConfig(num_samples=6, batch_size=4, iters=3, init="zeroq_uniform")
    ctx = SynthContext(
        3, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None
    )
    with forbid_real_data("test"):
        images, labels = synthesize_zeroq(teacher, cfg, ctx)
    assert images.shape == (6, 1, 8, 8) and labels.shape == (6,)
    assert float(images.abs().max()) > 0.1  # Adam at lr 0.5 moved the +-0.024 initial pixels
    with torch.no_grad():
        assert torch.equal(labels, teacher(images).argmax(1))
    assert not any(m._forward_hooks for m in teacher.modules())  # hooks removed


make_ctx = shard_context


def act_quantizers(model):
    return [m for m in model.modules() if hasattr(m, "update_ranges") and hasattr(m, "ema_mode")]


def test_zeroq_end_to_end_finetune(tmp_path):
    ctx, history = make_ctx(tmp_path, arch="resnet20")
    before = {k: v.clone() for k, v in ctx.student.state_dict().items() if "weight" in k}
    cfg = {"calib_batches": 1, "epochs": 2, "iters_per_epoch": 1, "batch_size": 4, "lr": 0.01}
    ZeroQ(cfg).run(ctx)
    assert [e for e, _ in history] == [0, 1]
    assert all(math.isfinite(extra["train_loss"]) for _, extra in history)
    assert act_quantizers(ctx.student) and not any(q.update_ranges for q in act_quantizers(ctx.student))
    after = ctx.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_zeroq_calibration_only(tmp_path):
    ctx, history = make_ctx(tmp_path)
    before = {k: v.clone() for k, v in ctx.student.state_dict().items() if "weight" in k}
    ZeroQ({"finetune": False, "calib_batches": 2, "batch_size": 16}).run(ctx)  # batch capped at 8
    assert history == [(0, {})]
    after = ctx.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zeroq_rejects_unknown_options(tmp_path):
    ctx, _ = make_ctx(tmp_path)
    from zsqpipe.errors import ConfigError

    with pytest.raises(ConfigError):
        ZeroQ({"augment": "mixup"}).run(ctx)
    with pytest.raises(ConfigError):
        initial_images("laplace", (1, 1, 2, 2), torch.Generator())


def test_optimise_pixels_keep_best_returns_the_pixels_of_the_lowest_loss():
    """A loss that falls, then jumps 100x at step 30 (as a late Adam jump): the last pixels carry the jumped loss,
    keep_best returns the pixels the lowest loss was computed on (before that step's update) and that loss."""
    seen: dict[int, tuple[float, torch.Tensor]] = {}

    def loss_fn(x, s):
        loss = ((x - 1.0) ** 2).sum() * (100.0 if s >= 30 else 1.0)
        seen[s] = (float(loss.detach()), x.detach().clone())
        return loss

    x0 = torch.zeros(2, 1, 2, 2)
    x_last, last, steps = optimise_pixels(x0, loss_fn, 40, 0.05, 100)
    assert steps == 40 and last == seen[39][0]
    best_step = min(seen, key=lambda s: seen[s][0])
    assert best_step < 30 and last > 10 * seen[best_step][0]
    best_x_seen = seen[best_step]
    seen.clear()  # the same trajectory (deterministic), only the returned pixels differ
    x_best, best, _ = optimise_pixels(x0, loss_fn, 40, 0.05, 100, keep_best=True)
    assert best == best_x_seen[0] and torch.equal(x_best, best_x_seen[1]) and not torch.equal(x_best, x_last)


@pytest.mark.parametrize("name", ["zeroq", "intraq", "hast"])
def test_every_pixel_synthesizer_passes_stop_drop_and_keep_best_to_the_loop_per_batch(name, monkeypatch):
    teacher = tiny_net()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fn, cfg_cls = get_synthesizer(name)
    steps = {}
    for stop_drop in (0.0, 0.999):  # 0.999: stops at the first check unless the BN loss fell 99.9 % in 100 steps
        ctx = SynthContext(3, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None)
        fn(teacher, cfg_cls(num_samples=6, batch_size=4, iters=150, stop_drop=stop_drop), ctx)
        assert [10 * len(t) for t in ctx.bn_traces] == ctx.steps  # one block mean per 10 steps, per batch
        steps[stop_drop] = ctx.steps
    assert steps == {0.0: [150, 150], 0.999: [110, 110]}
    module = importlib.import_module(f"zsqpipe.zsq.synth_{name}")
    seen = []  # keep_best reaches the loop, per batch
    real_loop = module.optimise_pixels

    def spy(*args, **kwargs):
        seen.append(kwargs.get("keep_best"))
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(module, "optimise_pixels", spy)
    ctx = SynthContext(3, (1, 8, 8), torch.device("cpu"), torch.Generator().manual_seed(0), log=lambda _m: None)
    fn(teacher, cfg_cls(num_samples=6, batch_size=4, iters=20, keep_best=True), ctx)
    assert seen == [True, True]
