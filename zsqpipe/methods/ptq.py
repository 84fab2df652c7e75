"""``ptq``: post-training quantization with real calibration data and no fine-tuning.

Weights use the quantizer's own min/max; activation ranges are the EMA over ``calib_images`` real training
images in batches of ``batch_size`` (model in eval mode, BN statistics untouched). One evaluation follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from zsqpipe.config import PosInt
from zsqpipe.engine import infinite
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.zsq.calibration import calibrate


@dataclass(frozen=True)
class PTQConfig:
    calib_images: PosInt = 512
    batch_size: PosInt = 128


@register_method("ptq")
class PostTrainingQuantization(Method):
    uses_real_data = True
    Config = PTQConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        n_batches = max(1, -(-c.calib_images // c.batch_size))
        ctx.student.eval()
        loader = ctx.train_loader_factory(c.batch_size, ctx.seed, augment=False)
        calibrate(ctx.student, infinite(loader), n_batches, ctx.log)
        ctx.end_epoch(0, {})
