"""Qimera: soft targets of superposed embeddings and soft-CE on fixed tensors, the generator's input path
(teacher-initialised embedding, official normalisation axes, DM on/off), alternation, tiny end-to-end runs."""

import math

import pytest
import torch
from method_helpers import quant_context

from zsqpipe.data import forbid_real_data
from zsqpipe.errors import ConfigError
from zsqpipe.methods.qimera import (
    Qimera,
    QimeraGenerator,
    classifier_weight,
    sample_latents,
    soft_cross_entropy,
    soft_targets,
)
from zsqpipe.zsq.bnstats import BNStatistics

SHAPE = (1, 8, 8)


def tiny_ctx(end_epoch=None, seed=0):
    return quant_context(seed=seed, end_epoch=end_epoch)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_soft_targets_of_superposition_hand_computed():
    labels = torch.tensor([[1, 1], [0, 2]])
    weights = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.4]])  # duplicate labels add up
    assert torch.allclose(soft_targets(labels, weights, 3), expected)


def test_soft_cross_entropy_hand_computed():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))  # softmax = (1/6, 2/6, 3/6)
    target = torch.tensor([[0.6, 0.0, 0.4]])
    expected = 0.6 * math.log(6) + 0.4 * math.log(2)
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert soft_cross_entropy(torch.zeros(2, 5), torch.eye(5)[:2]).item() == pytest.approx(
        math.log(5), rel=1e-6
    )


def test_student_loss_is_kd_plus_soft_ce():
    m = Qimera({"kd_temperature": 2.0})
    t = torch.tensor([[2 * math.log(3), 0.0, 0.0, 0.0]])  # p_t(T=2) = (1/2, 1/6, 1/6, 1/6)
    s = torch.zeros(1, 4)
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    expected = 0.5 * math.log(4 / 3) + math.log(4)  # 'mean' KD (T^2/C x KL) + soft-CE of a uniform prediction
    assert m.student_loss(s, t, target).item() == pytest.approx(expected, rel=1e-6)


def test_sample_latents_mixed_and_plain():
    rng = torch.Generator().manual_seed(0)
    z, labels, weights, target = sample_latents(6, 10, 8, mix_prob=1.0, mix_k=3, rng=rng)
    assert z.shape == (6, 3, 8) and labels.shape == (6, 3) and weights.shape == (6, 3)
    assert torch.allclose(weights.sum(1), torch.ones(6)) and torch.allclose(target.sum(1), torch.ones(6))
    assert torch.allclose(target, soft_targets(labels, weights, 10))
    z, labels, weights, target = sample_latents(6, 10, 8, mix_prob=0.0, mix_k=3, rng=rng)
    assert z.shape == (6, 8) and weights is None and torch.equal(target.argmax(1), labels)
    assert torch.equal(target.sum(1), torch.ones(6))


def test_generator_embedding_normalisation_and_dm():
    ctx, _ = tiny_ctx()
    w = classifier_weight(ctx.teacher, 10)
    assert w.shape == (10, 64)  # ResNet-20's FC: the embedding dimension is the FC input dimension
    g = Qimera({}).build_generator(ctx)
    assert torch.equal(g.label_emb.weight, w) and g.label_emb.weight.requires_grad
    assert g.fc_reducer is not None and g.l1.in_features == 100 and g.latent_dim == 64
    g_off = Qimera(
        {"disentanglement": False, "random_embedding": True, "freeze_embedding": True}
    ).build_generator(ctx)
    assert g_off.fc_reducer is None and g_off.l1.in_features == 64
    assert not torch.equal(g_off.label_emb.weight, w) and not g_off.label_emb.weight.requires_grad
    # official axes: per sample over the latent dims (B, D); per component slot over (B, D) for (B, K, D)
    h2 = QimeraGenerator.normalise(torch.randn(5, 7) * 3 + 2)
    assert torch.allclose(h2.mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(h2.var(1, unbiased=False), torch.ones(5), atol=1e-3)
    h3 = QimeraGenerator.normalise(torch.randn(5, 2, 7) * 3 + 2)
    assert torch.allclose(h3.mean((0, 2)), torch.zeros(2), atol=1e-5)


def test_superposed_input_is_the_weighted_sum_of_component_inputs():
    ctx, _ = tiny_ctx()
    g = Qimera({}).build_generator(ctx)
    z = torch.randn(4, 2, 64)
    labels = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    lam = torch.tensor([[0.25, 0.75]] * 4)
    per_component = g.fc_reducer(QimeraGenerator.normalise(g.label_emb(labels) + z))  # (B, K, 100)
    expected = 0.25 * per_component[:, 0] + 0.75 * per_component[:, 1]
    assert torch.allclose(g.embed(z, labels, lam), expected, atol=1e-6)
    assert g(z, labels, lam).shape == (4, *SHAPE)


def test_generator_step_uses_soft_ce_and_only_steps_generator():
    ctx, _ = tiny_ctx()
    m = Qimera({"batch_size": 4, "mix_prob": 1.0, "mix_k": 2})
    gen = m.build_generator(ctx)
    opt = m.make_generator_optimizer(gen)
    before = params(gen)
    bn = BNStatistics(ctx.teacher)
    rng = torch.Generator().manual_seed(3)
    # the expected loss, recomputed from the same latents before the step (train-mode BN: batch statistics)
    z, labels, weights, target = sample_latents(4, 10, 64, 1.0, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = soft_cross_entropy(ctx.teacher(gen(z, labels, weights)), target) + 0.1 * bn.batch_loss()
    x, tgt, t_logits, loss = m.generator_step(gen, ctx.teacher, bn, opt, rng, ctx.device)
    bn.remove()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(tgt, target) and t_logits.shape == (4, 10) and not x.requires_grad
    assert not same(before, params(gen))
    assert all(p.grad is None for p in ctx.student.parameters())


@pytest.mark.parametrize(
    "cfg",
    [
        {"mix_prob": 1.0, "mix_k": 3},
        {"mix_prob": 0.0, "disentanglement": False, "random_embedding": True, "kd_reduction": "batchmean"},
    ],
)
def test_run_end_to_end_reads_no_real_data(cfg):
    snaps = []
    m = Qimera({"epochs": 2, "warmup_epochs": 1, "iters_per_epoch": 1, "batch_size": 4, **cfg})

    def end_epoch(epoch, metrics):
        snaps.append((params(ctx.student), metrics))
        return metrics

    ctx, _ = tiny_ctx(end_epoch)
    student0 = params(ctx.student)
    with forbid_real_data("qimera test"):
        m.run(ctx)
    (s_warm, met0), (s_train, met1) = snaps
    assert same(student0, s_warm) and not same(s_warm, s_train)
    assert all(
        math.isfinite(v) for v in (met0["train_loss"], met0["g_loss"], met1["train_loss"], met1["g_loss"])
    )


@pytest.mark.parametrize("cfg", [{"mix_prob": 1.5}, {"mix_k": 0}, {"warmup_epochs": 0}])
def test_bad_config_is_rejected(cfg):
    with pytest.raises(ConfigError):
        Qimera(cfg)
