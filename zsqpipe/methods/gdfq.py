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

:class:`GDFQ` is written as a base class: Qimera (``zsqpipe/methods/qimera.py``) overrides
:meth:`GDFQ.build_generator`, :meth:`GDFQ.generator_step` and :meth:`GDFQ.student_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.engine import kd_kl, make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.methods.real import warn_short_official_calibration
from zsqpipe.quant import set_quant_state
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.generators import GDFQGenerator, gdfq_generator_step

KD_REDUCTIONS = ("mean", "batchmean")


@dataclass(frozen=True)
class GDFQConfig:
    epochs: int = 3  # warm-up epochs included (the official 400 include its 4 warm-up epochs)
    warmup_epochs: int = 1
    iters_per_epoch: int = 20
    batch_size: int = 64
    latent_dim: int = 100
    # student (SGD, Nesterov, as the official trainer)
    optimizer: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.25, 0.5, 0.75)  # schedule "step" (official: epochs 100/200/300 of 400)
    # generator (Adam, betas (0.5, 0.999))
    lr_g: float = 1e-3
    g_beta1: float = 0.5
    g_beta2: float = 0.999
    bns_weight: float = 0.1
    # student loss
    kd_temperature: float = 20.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    kd_reduction: str = "mean"  # "mean" = official nn.KLDivLoss() (T^2/C x batchmean KL); "batchmean"


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)).

    ``"batchmean"``: the KL summed over classes and averaged over the batch (``zsqpipe.engine.kd_kl``);
    ``"mean"``: ``nn.KLDivLoss()``'s default reduction, averaged over all B*C elements, i.e. batchmean / C
    (GDFQ/Qimera ``loss_fn_kd``).
    """
    if reduction == "batchmean":
        return kd_kl(student_logits, teacher_logits, temperature)
    if reduction == "mean":  # = F.kl_div(..., reduction="mean"), without its deprecation warning
        t = temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="sum"
        )
        return kl / student_logits.numel() * t * t
    raise ConfigError(f"kd_reduction: expected one of {list(KD_REDUCTIONS)}, got {reduction!r}")


def check_common(cfg, prefix: str) -> None:
    """Checks shared by GDFQ and Qimera (one-line ConfigErrors)."""
    if cfg.kd_reduction not in KD_REDUCTIONS:
        raise ConfigError(
            f"{prefix}.kd_reduction: expected one of {list(KD_REDUCTIONS)}, got {cfg.kd_reduction!r}"
        )
    if not 1 <= cfg.warmup_epochs <= cfg.epochs:
        raise ConfigError(
            f"{prefix}.warmup_epochs: expected 1..epochs ({cfg.epochs}) (activation ranges are calibrated during "
            f"warm-up), got {cfg.warmup_epochs}"
        )
    for key in ("epochs", "iters_per_epoch", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{prefix}.{key}: expected a positive integer, got {getattr(cfg, key)}")
    if cfg.batch_size < 2:
        raise ConfigError(f"{prefix}.batch_size: the generator's BatchNorm needs at least 2 samples")


@register_method("gdfq")
class GDFQ(Method):
    """The GDFQ epoch loop; subclasses override the generator, its step and the student loss."""

    uses_real_data = False
    synthesizer = None
    Config = GDFQConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        check_common(self.cfg, f"methods.{self.name}")

    # --- overridable parts -------------------------------------------------------------------------------
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

    # --- the loop ----------------------------------------------------------------------------------------
    def make_generator_optimizer(self, generator: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in generator.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.lr_g, betas=(self.cfg.g_beta1, self.cfg.g_beta2))

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        teacher, student = ctx.teacher, ctx.student
        teacher.eval()
        student.eval()  # BN running statistics fixed, affine trained (GDFQ-family trainers)
        generator = self.build_generator(ctx).to(ctx.device)
        generator.train()
        self.generator = generator  # kept for inspection (tests)
        opt_g = self.make_generator_optimizer(generator)
        sched_g = make_scheduler(opt_g, c.schedule, c.epochs * c.iters_per_epoch, milestones=c.milestones)
        opt_s = make_optimizer(
            student.parameters(), c.optimizer, c.lr, c.momentum, c.weight_decay, c.nesterov
        )
        student_steps = (c.epochs - c.warmup_epochs) * c.iters_per_epoch
        sched_s = make_scheduler(opt_s, c.schedule, max(student_steps, 1), milestones=c.milestones)
        warm_steps = c.warmup_epochs * c.iters_per_epoch
        warn_short_official_calibration(student, warm_steps, ctx.log)
        rng = torch.Generator().manual_seed(ctx.seed)
        start = ctx.resumable(generator=generator, generator_optimizer=opt_g, generator_scheduler=sched_g,
                              optimizer=opt_s, scheduler=sched_s, rng=rng)  # fmt: skip
        bn_stats = BNStatistics(teacher)
        try:
            for epoch in range(start, c.epochs):
                warm = epoch < c.warmup_epochs
                set_quant_state(student, update_ranges=warm)
                sums = {"train_loss": 0.0, "g_loss": 0.0}
                for _ in range(c.iters_per_epoch):
                    x, target, t_logits, g_loss = self.generator_step(
                        generator, teacher, bn_stats, opt_g, rng, ctx.device
                    )
                    sched_g.step()
                    x = x.contiguous(memory_format=torch.channels_last)
                    if t_logits is None:
                        with torch.no_grad():
                            t_logits = teacher(x)
                    if warm:  # ranges follow the generator's samples; the student is not stepped
                        with torch.no_grad():
                            loss = self.student_loss(student(x), t_logits, target)
                    else:
                        loss = self.student_loss(student(x), t_logits, target)
                        opt_s.zero_grad(set_to_none=True)
                        loss.backward()
                        opt_s.step()
                        sched_s.step()
                    sums["train_loss"] += float(loss.detach())
                    sums["g_loss"] += float(g_loss)
                set_quant_state(student, update_ranges=False)  # frozen for evaluation and after warm-up
                metrics = {k: v / c.iters_per_epoch for k, v in sums.items()}
                metrics.update(
                    lr=opt_s.param_groups[0]["lr"], lr_g=opt_g.param_groups[0]["lr"], warmup=float(warm)
                )
                ctx.end_epoch(epoch, metrics)
                student.eval()
        finally:
            bn_stats.remove()
            set_quant_state(student, update_ranges=False)
