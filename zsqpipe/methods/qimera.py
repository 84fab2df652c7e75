"""``qimera``: data-free quantization with synthetic boundary supporting samples (Choi et al., NeurIPS 2021).

GDFQ (``zsqpipe/methods/gdfq.py``) plus superposed latent embeddings, following the official
``iamkanghyunchoi/qimera`` ``main.py: Generator`` and ``trainer.py: Trainer.train`` as described in
``shared/reference/zero-shot-quantization.md`` §2.2 and §7.6 (implemented from that note, no official code
copied). Paper equations written out below (superposed latent embedding, soft target, disentanglement
mapping; the paper's equation numbers were not checked against its text):

- generator input for label y: h = norm(e_y + s*z) with the embedding e initialised from the teacher's
  classifier weight (or random), ``norm`` a BatchNorm1d without affine; optional disentanglement mapping
  (DM) h <- W h + b (latent -> 100) before the GDFQ trunk;
- with probability ``mix_prob`` per iteration the whole batch is superposed: K = ``mix_k`` labels per sample,
  lambda = softmax(randn(B, K)), generator input sum_k lambda_k h_k, soft target y~ = sum_k lambda_k onehot(y_k);
- L_G = -sum_c y~_c log softmax(P(x))_c + 0.1 * BNS;   L_Q = T^2 * KL (GDFQ's, 'mean') + soft-CE(Q(x), y~).

The official ``--no_DM`` flag is ``store_false``: DM is OFF in every official run (passing ``--no_DM`` turns
it on). DM is part of the paper's method, so ``disentanglement: true`` is our default and ``false`` reproduces
the official runs (docs/methods/qimera.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import (
    Doc,
    Milestones,
    Momentum,
    NonNegFloat,
    NonNegInt,
    OneOf,
    Optimizer,
    PosFloat,
    PosInt,
    Prob,
    Range,
    Schedule,
)
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import QuantContext, register_method
from zsqpipe.zsq.generator_qat import KD_REDUCTIONS, GeneratorQAT, kd_loss
from zsqpipe.zsq.generators import GDFQGenerator

NORM_EPS = 1e-5  # BatchNorm1d's default eps, as in the official embedding normaliser


@dataclass(frozen=True)
class QimeraConfig:
    epochs: Annotated[PosInt, Doc("warm-up epochs included")] = 3
    warmup_epochs: Annotated[PosInt, Doc("ranges + generator only; at most epochs")] = 1
    # generator steps per warm-up epoch; 0 = iters_per_epoch (official: 200 every epoch)
    warmup_iters: Annotated[NonNegInt, Doc("generator steps per warm-up epoch; 0 = iters_per_epoch")] = 0
    iters_per_epoch: PosInt = 20
    batch_size: Annotated[int, Range(ge=2)] = 64
    # student (SGD, Nesterov)
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 0.005
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.25, 0.5, 0.75)
    # generator (Adam, betas (0.5, 0.999))
    lr_g: PosFloat = 1e-3
    g_beta1: Momentum = 0.5
    g_beta2: Momentum = 0.999
    bns_weight: NonNegFloat = 0.1
    # superposed latent embeddings
    mix_prob: Prob = 0.4  # official CIFAR-10 / CIFAR-100 / ResNet-18 value
    mix_k: PosInt = 2  # official CIFAR-10 value (CIFAR-100: 10; ImageNet: 100-500)
    noise_scale: NonNegFloat = 1.0
    # False: embedding initialised from the teacher's classifier weight
    random_embedding: Annotated[bool, Doc("false = embedding from the teacher's classifier weight")] = False
    freeze_embedding: bool = False  # official --freeze (off in every shipped script)
    # paper's DM; the official runs have it OFF (--no_DM flag inversion)
    disentanglement: Annotated[bool, Doc("paper's DM; false = official runs (--no_DM flag inversion)")] = True
    dm_dim: PosInt = 100  # official intermediate_dim
    # student loss
    kd_temperature: PosFloat = 20.0
    kd_weight: NonNegFloat = 1.0
    ce_weight: NonNegFloat = 1.0
    # "mean" = official nn.KLDivLoss() (T^2/C x batchmean KL); "batchmean"
    kd_reduction: Annotated[
        str, OneOf(*KD_REDUCTIONS), Doc("mean = official nn.KLDivLoss() (T^2/C x batchmean KL)")
    ] = "mean"


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b -sum_c target_bc * log softmax(logits)_bc (the official ``loss_one_hot`` / student CE)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_targets(labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatter-add of the superposition weights: y~_b = sum_k weights_bk * onehot(labels_bk) (duplicates add)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return out.scatter_add_(1, labels, weights)


def classifier_weight(model: nn.Module, num_classes: int) -> torch.Tensor:
    """The weight (num_classes x features) of the model's last Linear layer (pytorchcv ``.output``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].out_features != num_classes:
        raise ConfigError(f"qimera: the teacher has no final Linear layer with {num_classes} outputs")
    return linears[-1].weight.detach()


class QimeraGenerator(GDFQGenerator):
    """GDFQ trunk with Qimera's input: norm(label_emb(y) + noise_scale * z) [-> DM], superposable.

    ``norm`` is the official ``BatchNorm1d(affine=False, track_running_stats=False)`` applied to the
    *transposed* input: for a plain batch (B, D) the statistics are per sample over the D latent dimensions;
    for a superposed batch (B, K, D) they are per component slot k over (B, D).
    """

    def __init__(
        self,
        num_classes: int,
        shape: tuple[int, int, int],
        emb_dim: int,
        noise_scale: float = 1.0,
        disentanglement: bool = True,
        dm_dim: int = 100,
        init_weight: torch.Tensor | None = None,
        freeze_embedding: bool = False,
    ):
        super().__init__(num_classes, shape, latent_dim=dm_dim if disentanglement else emb_dim)
        self.latent_dim = emb_dim  # the dimension of z (and of the embedding)
        self.noise_scale = noise_scale
        self.label_emb = nn.Embedding(num_classes, emb_dim)  # replaces GDFQ's (C x trunk input) embedding
        if init_weight is not None:
            with torch.no_grad():
                self.label_emb.weight.copy_(init_weight)
        self.label_emb.weight.requires_grad_(not freeze_embedding)
        self.fc_reducer = nn.Linear(emb_dim, dm_dim) if disentanglement else None

    @staticmethod
    def normalise(h: torch.Tensor) -> torch.Tensor:
        dims = (1,) if h.dim() == 2 else (0, 2)
        mean = h.mean(dim=dims, keepdim=True)
        var = h.var(dim=dims, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + NORM_EPS)

    def embed(
        self, z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z, labels: (B, D), (B,) or, superposed, (B, K, D), (B, K) with ``weights`` (B, K)."""
        h = self.normalise(self.label_emb(labels) + self.noise_scale * z)
        if self.fc_reducer is not None:
            h = self.fc_reducer(h)
        if weights is not None:
            h = (h * weights.unsqueeze(-1)).sum(dim=1)
        return h

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decode(self.embed(z, labels, weights))


def sample_latents(
    batch_size: int, num_classes: int, latent_dim: int, mix_prob: float, mix_k: int, rng: torch.Generator
):
    """One iteration's latent batch: (z, labels, weights or None, soft targets), all on the CPU."""
    if float(torch.rand((), generator=rng)) < mix_prob:
        z = torch.randn(batch_size, mix_k, latent_dim, generator=rng)
        labels = torch.randint(0, num_classes, (batch_size, mix_k), generator=rng)
        weights = torch.softmax(torch.randn(batch_size, mix_k, generator=rng), dim=1)
        return z, labels, weights, soft_targets(labels, weights, num_classes)
    z = torch.randn(batch_size, latent_dim, generator=rng)
    labels = torch.randint(0, num_classes, (batch_size,), generator=rng)
    return z, labels, None, F.one_hot(labels, num_classes).float()


@register_method("qimera")
class Qimera(GeneratorQAT):
    Config = QimeraConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c, prefix = self.cfg, f"methods.{self.name}"
        if not 0.0 <= c.mix_prob <= 1.0:
            raise ConfigError(f"{prefix}.mix_prob: expected a probability in [0, 1], got {c.mix_prob}")
        if c.mix_k < 1 or c.dm_dim < 1:
            raise ConfigError(
                f"{prefix}.mix_k / dm_dim: expected positive integers, got {c.mix_k} / {c.dm_dim}"
            )

    def build_generator(self, ctx: QuantContext) -> nn.Module:
        c = self.cfg
        weight = classifier_weight(ctx.teacher, ctx.num_classes)
        return QimeraGenerator(
            ctx.num_classes,
            tuple(ctx.input_shape),
            emb_dim=weight.shape[1],
            noise_scale=c.noise_scale,
            disentanglement=c.disentanglement,
            dm_dim=c.dm_dim,
            init_weight=None if c.random_embedding else weight,
            freeze_embedding=c.freeze_embedding,
        )

    def generator_step(self, generator, teacher, bn_stats, optimizer, rng, device):
        c = self.cfg
        z, labels, weights, target = sample_latents(
            c.batch_size, generator.num_classes, generator.latent_dim, c.mix_prob, c.mix_k, rng
        )
        z, labels, target = z.to(device), labels.to(device), target.to(device)
        weights = None if weights is None else weights.to(device)
        x = generator(z, labels, weights)
        t_logits = teacher(x)
        loss = soft_cross_entropy(t_logits, target) + c.bns_weight * bn_stats.batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return x.detach(), target, t_logits.detach(), float(loss.detach())

    def student_loss(self, s_logits, t_logits, target) -> torch.Tensor:
        c = self.cfg
        kd = kd_loss(s_logits, t_logits, c.kd_temperature, c.kd_reduction)
        return c.kd_weight * kd + c.ce_weight * soft_cross_entropy(s_logits, target)
