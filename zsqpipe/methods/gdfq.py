"""``gdfq``: Generative Low-bitwidth Data-Free Quantization (Xu et al., ECCV 2020).

Follows the official ``xushoukai/GDFQ`` ``trainer.py: Trainer.train`` and ``main.py: run`` as described in
``shared/reference/zero-shot-quantization.md`` §2.1 (implemented from that note, no official code copied).
Paper equations (written out here; the paper's equation numbers were not checked against its text):
the knowledge-matching generator loss (CE + BN-statistics loss) and the fine-tuning loss (KD + CE).
Per iteration:

1. generator step (knowledge-matching generator): z ~ N(0, I), y ~ U{0..C-1},
   x = G(z, y), L_G = CE(P(x), y) + 0.1 * BNS(x) (``zsqpipe.zsq.generators.gdfq_generator_step``); G gets no
   signal from the quantized student Q;
2. student step on x.detach() (fine-tuning with KD): L_Q = kd_weight * T^2 * KL(P(x)/T || Q(x)/T)
   + ce_weight * CE(Q(x), y), T = 20; the official KL is ``nn.KLDivLoss()``'s 'mean' over B*C elements
   (``kd_reduction="mean"``, weight T^2 / C on the batchmean KL), ``"batchmean"`` is the per-sample KL;
3. the first ``warmup_epochs`` epochs update the activation ranges (EMA) and the generator, not the student;
   ranges are frozen after warm-up.

The epoch loop is :class:`zsqpipe.zsq.generator_qat.GeneratorQAT`, shared with Qimera
(``zsqpipe/methods/qimera.py``); this module holds GDFQ's generator, generator step and student loss.
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
from zsqpipe.methods.base import QuantContext, register_method
from zsqpipe.zsq.generator_qat import KD_REDUCTIONS, GeneratorQAT, kd_loss
from zsqpipe.zsq.generators import GDFQGenerator, gdfq_generator_step


@dataclass(frozen=True)
class GDFQConfig:
    # warm-up epochs included (the official 400 include its 4 warm-up epochs)
    epochs: Annotated[PosInt, Doc("warm-up epochs included")] = 3
    warmup_epochs: Annotated[PosInt, Doc("ranges + generator only; at most epochs")] = 1
    # generator steps per warm-up epoch; 0 = iters_per_epoch (official: 200 every epoch)
    warmup_iters: Annotated[NonNegInt, Doc("generator steps per warm-up epoch; 0 = iters_per_epoch")] = 0
    iters_per_epoch: PosInt = 20
    batch_size: Annotated[int, Range(ge=2)] = 64
    latent_dim: PosInt = 100
    # student (SGD, Nesterov, as the official trainer)
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 0.005
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.25, 0.5, 0.75)  # schedule "step" (official: epochs 100/200/300 of 400)
    # generator (Adam, betas (0.5, 0.999))
    lr_g: PosFloat = 1e-3
    g_beta1: Momentum = 0.5
    g_beta2: Momentum = 0.999
    bns_weight: NonNegFloat = 0.1
    # student loss
    kd_temperature: PosFloat = 20.0
    kd_weight: NonNegFloat = 1.0
    ce_weight: NonNegFloat = 1.0
    # "mean" = official nn.KLDivLoss() (T^2/C x batchmean KL); "batchmean"
    kd_reduction: Annotated[
        str, OneOf(*KD_REDUCTIONS), Doc("mean = official nn.KLDivLoss() (T^2/C x batchmean KL)")
    ] = "mean"


@register_method("gdfq")
class GDFQ(GeneratorQAT):
    """GDFQ: the knowledge-matching generator (CE + BNS) and the KD + CE student loss."""

    Config = GDFQConfig

    def build_generator(self, ctx: QuantContext) -> nn.Module:
        return GDFQGenerator(ctx.num_classes, tuple(ctx.input_shape), self.cfg.latent_dim)

    def generator_step(self, generator, teacher, bn_stats, optimizer, rng, device):
        """One generator update. Returns (x detached, target, teacher logits on x or None, L_G)."""
        x, y, loss = gdfq_generator_step(
            generator, teacher, bn_stats, optimizer, self.cfg.batch_size, rng, device, self.cfg.bns_weight
        )
        return x, y, None, loss

    def student_loss(self, s_logits, t_logits, target) -> torch.Tensor:
        c = self.cfg
        kd = kd_loss(s_logits, t_logits, c.kd_temperature, c.kd_reduction)
        return c.kd_weight * kd + c.ce_weight * F.cross_entropy(s_logits, target)
