"""``zeroq``: ZeroQ's distilled data (Cai et al., CVPR 2020, Eq. 2; synthesizer ``zeroq``,
``zsqpipe/zsq/synth_zeroq.py``) used the way later papers re-implement ZeroQ at low bit-widths (IntraQ's
tables, IntraQ issue #1; reference note §2.6):

1. calibration: ``calib_batches`` batches of the distilled samples through the quantized student with
   activation ranges updating (ZeroQ ``classification/uniform_test.py``: one forward pass of the distilled
   data), then ranges are frozen;
2. fine-tuning (``finetune: true``, the re-implementation): ``epochs`` x ``iters_per_epoch`` SGD steps on
   streamed shard batches with knowledge distillation only,
       L = kd_weight * T^2 * KL(softmax(P(x)/T) || softmax(S(x)/T))   (batchmean; ``engine.kd_kl``)
   (+ ``ce_weight`` * CE on the teacher-argmax labels, 0 by default), student in eval mode, batches
   augmented with IntraQ's RandomResizedCrop(scale (aug_margin, 1)) + flip.
``finetune: false`` is the original protocol (calibration only, one evaluation), as in the official
``uniform_test.py`` (which is W8A8 only).
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
    Optimizer,
    PosFloat,
    PosInt,
    Prob,
    Range,
    Schedule,
)
from zsqpipe.engine import kd_kl
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.zsq.calibration import calibrate
from zsqpipe.zsq.finetune import ShardStream, check_augment, finetune


@dataclass(frozen=True)
class ZeroQConfig:
    # false = the original ZeroQ protocol: calibrate ranges, no training
    finetune: Annotated[bool, Doc("false = original ZeroQ: calibrate only")] = True
    calib_batches: PosInt = 4  # 4 x 128 = one pass over the 512 default samples
    epochs: PosInt = 2
    iters_per_epoch: PosInt = 20  # 2 x 20 steps: every method's fine-tuning budget (docs/budget.md)
    batch_size: PosInt = 128
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 2.5e-4  # x kd_weight 20 = 0.005, the `real` step size (paper harness: 1e-4 for 30k steps)
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    kd_temperature: PosFloat = 20.0  # IntraQ harness T
    kd_weight: NonNegFloat = 20.0  # IntraQ harness alpha (8,000 x batchmean KL with T = 20)
    ce_weight: NonNegFloat = 0.0  # KD only (IntraQ issue #1: "KD, or KD+CE")
    augment: Augment = "rrc"  # rrc (IntraQ's RandomResizedCrop + flip) | crop_flip (pad-crop + flip) | none
    aug_margin: Annotated[float, Range(gt=0, le=1)] = 0.5  # RandomResizedCrop scale lower bound


@register_method("zeroq")
class ZeroQ(Method):
    uses_real_data = False
    synthesizer = "zeroq"
    Config = ZeroQConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        check_augment(c, "zeroq")
        student, teacher = ctx.student, ctx.teacher
        student.eval()
        calibrate(student, ShardStream(ctx, c.batch_size, ctx.seed), c.calib_batches, ctx.log)
        if not c.finetune:
            ctx.end_epoch(0, {})
            return
        batches = ShardStream(ctx, c.batch_size, ctx.seed + 1, c.augment, c.aug_margin)

        def step(_it: int) -> torch.Tensor:
            x, y = next(batches)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = c.kd_weight * kd_kl(s_logits, t_logits, c.kd_temperature)
            if c.ce_weight:
                loss = loss + c.ce_weight * F.cross_entropy(s_logits, y)
            return loss

        finetune(ctx, c, step, stateful={"batches": batches})
