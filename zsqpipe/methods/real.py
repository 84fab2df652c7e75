"""``real``: quantization-aware fine-tuning on the real training set with knowledge distillation.

The upper bound that every zero-shot table compares to. Same harness as the GDFQ family:
1. calibration: ``calib_batches`` forward passes on training batches with activation ranges updating and no
   weight update (GDFQ's warm-up epochs), then ranges are frozen;
2. fine-tuning: ``epochs`` x ``iters_per_epoch`` SGD steps on
   L = ce_weight * CE(S(x), y) + kd_weight * T^2 * KL(softmax(P(x)/T) || softmax(S(x)/T))  (batchmean),
   with the student in eval mode (BN uses its running statistics; its affine parameters train), as in the
   GDFQ/IntraQ/HAST trainers.
After every epoch the student is evaluated on the validation split and on the test set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsqpipe.engine import infinite, kd_kl, make_optimizer, make_scheduler
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.quant import set_quant_state


@dataclass(frozen=True)
class RealConfig:
    epochs: int = 2
    iters_per_epoch: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    calib_batches: int = 8
    kd_temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    bn_train: bool = False


OFFICIAL_EMA_MIN_STEPS = 200


def warn_short_official_calibration(student, steps: int, log=print) -> None:
    """Warn when ``quant.ema_mode=official`` gets fewer calibration steps than its range update needs."""
    if steps < OFFICIAL_EMA_MIN_STEPS and any(
        getattr(m, "ema_mode", None) == "official" for m in student.modules()
    ):
        log(
            f"warning: quant.ema_mode=official with {steps} calibration steps: the official range update "
            f"inflates ranges for its first ~150 steps (docs/quantization.md); use >= {OFFICIAL_EMA_MIN_STEPS}"
        )


def calibrate(student, batches, calib_batches: int, log=print) -> None:
    """Run ``calib_batches`` batches through ``student`` with range updates on, then freeze the ranges."""
    warn_short_official_calibration(student, calib_batches, log)
    set_quant_state(student, enabled=True, update_ranges=True)
    with torch.no_grad():
        for _ in range(calib_batches):
            x, _ = next(batches)
            student(x)
    set_quant_state(student, update_ranges=False)


@register_method("real")
class RealData(Method):
    uses_real_data = True
    Config = RealConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        batches = infinite(ctx.train_loader_factory(c.batch_size, ctx.seed))
        student, teacher = ctx.student, ctx.teacher
        student.eval()
        calibrate(student, batches, c.calib_batches, ctx.log)
        student.train(c.bn_train)
        opt = make_optimizer(student.parameters(), c.optimizer, c.lr, c.momentum, c.weight_decay, c.nesterov)
        sched = make_scheduler(opt, c.schedule, c.epochs * c.iters_per_epoch, milestones=c.milestones)
        for epoch in range(c.epochs):
            total = 0.0
            for _ in range(c.iters_per_epoch):
                x, y = next(batches)
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
                loss = c.ce_weight * F.cross_entropy(s_logits, y) + c.kd_weight * kd_kl(
                    s_logits, t_logits, c.kd_temperature
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            ctx.end_epoch(epoch, {"train_loss": total / c.iters_per_epoch, "lr": opt.param_groups[0]["lr"]})
            student.train(c.bn_train)
