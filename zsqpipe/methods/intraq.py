"""``intraq``: IntraQ fine-tuning (Zhong et al., CVPR 2022) on the ``intraq`` synthetic images
(``zsqpipe/zsq/synth_intraq.py``), following the official ``zysxmu/IntraQ: trainer_direct.py`` and
``main_direct.py`` as described in the reference note §2.3:

1. calibration of the activation ranges, then ranges frozen:
   - ``calibration: generator`` (default, the official code): a GDFQ generator is trained for
     ``generator_steps`` steps on L_G = CE(P(G(z, y)), y) + bns_weight * BNS (batch 16 in the code) and each
     of its batches runs through the student with range updates on; the generator is then dropped
     (``zsqpipe.zsq.calibration.calibrate_with_generator``, shared with HAST);
   - ``calibration: shards``: ``calib_batches`` batches of the synthetic set through the student (the
     paper-level reading; at W3A3 on the default its samples' large activations stretch the ranges: 30.8 %
     vs 84.2 %, docs/methods/intraq.md);
2. fine-tuning, ``epochs`` x ``iters_per_epoch`` SGD steps on shard batches augmented with
   RandomResizedCrop(scale (aug_margin, 1)) + horizontal flip:
       L_S = alpha * T^2 * KL(softmax(P(x)/T) || softmax(S(x)/T)) + CE(S(x), y)   (KL batchmean)
   with alpha = ``kd_weight`` = 20, T = ``kd_temperature`` = 20 (8,000 x batchmean KL), y the sampled
   labels stored in the shards, the student in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from zsqpipe.config import (
    Augment,
    Doc,
    Milestones,
    NonNegFloat,
    OneOf,
    Optimizer,
    PosFloat,
    PosInt,
    Prob,
    Range,
    Schedule,
)
from zsqpipe.engine import kd_kl
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.zsq.calibration import CalibrationGenerator, calibrate, calibrate_with_generator
from zsqpipe.zsq.finetune import ShardStream, check_augment, finetune

CALIBRATIONS = ("generator", "shards")


@dataclass(frozen=True)
class IntraQConfig:
    # generator (official: GDFQ generator, 4 epochs x 200 steps) | shards
    calibration: Annotated[
        str, OneOf(*CALIBRATIONS), Doc("generator = official GDFQ-generator calibration; shards = the synthetic images")
    ] = "generator"
    calib_batches: PosInt = 4  # calibration "shards": 4 x 128 = two passes over the 256 default samples
    generator_steps: PosInt = 200  # official 800 (4 epochs x 200); 200 = HAST's calib_iters (docs/budget.md)
    generator_batch_size: PosInt = 16  # official 16
    generator_lr: PosFloat = 1e-3
    generator_latent_dim: PosInt = 100
    bns_weight: NonNegFloat = 0.1
    epochs: PosInt = 2
    iters_per_epoch: PosInt = 20  # 2 x 20 steps: every method's fine-tuning budget (docs/budget.md)
    batch_size: PosInt = 128
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 2.5e-4  # x alpha 20 = 0.005, the `real` step size (paper: 1e-4 for 147 x 200 steps)
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    kd_temperature: PosFloat = 20.0
    kd_weight: NonNegFloat = 20.0  # alpha
    ce_weight: NonNegFloat = 1.0
    augment: Augment = "rrc"  # rrc (official) | crop_flip | none
    aug_margin: Annotated[float, Range(gt=0, le=1)] = 0.5


@register_method("intraq")
class IntraQ(Method):
    uses_real_data = False
    synthesizer = "intraq"
    Config = IntraQConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        check_augment(c, "intraq")
        if c.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"methods.intraq.calibration: expected one of {list(CALIBRATIONS)}, got {c.calibration!r}"
            )
        student, teacher = ctx.student, ctx.teacher
        student.eval()
        if c.calibration == "generator":
            gen = CalibrationGenerator(c.generator_steps, c.generator_batch_size, c.generator_lr,
                                       c.generator_latent_dim, c.bns_weight)  # fmt: skip
            calibrate_with_generator(student, teacher, ctx.num_classes, ctx.input_shape, gen, ctx.seed, ctx.device,
                                     ctx.log, "intraq", warmup=ctx.warmup)  # fmt: skip
        else:
            calibrate(student, ShardStream(ctx, c.batch_size, ctx.seed), c.calib_batches, ctx.log)
        batches = ShardStream(ctx, c.batch_size, ctx.seed + 1, c.augment, c.aug_margin)

        def step(_it: int) -> torch.Tensor:
            x, y = next(batches)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            return c.kd_weight * kd_kl(s_logits, t_logits, c.kd_temperature) + c.ce_weight * F.cross_entropy(
                s_logits, y
            )

        finetune(ctx, c, step, stateful={"batches": batches})
