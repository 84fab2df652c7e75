"""The GDFQ-family training loop shared by ``gdfq`` and ``qimera`` (generator step, then student step on the
generator's detached batch; activation ranges calibrated during the warm-up epochs), with the KD loss both use.

Kept out of the method plug-ins so that editing ``methods/gdfq.py`` reruns GDFQ's cells only and editing
``methods/qimera.py`` Qimera's: each plug-in implements :meth:`GeneratorQAT.build_generator`,
:meth:`GeneratorQAT.generator_step` and :meth:`GeneratorQAT.student_loss` (GDFQ's Eqs. in
``methods/gdfq.py``'s docstring).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.engine import kd_kl, make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import Method, QuantContext
from zsqpipe.quant import set_quant_state
from zsqpipe.zsq.bnstats import BNStatistics
from zsqpipe.zsq.calibration import warn_short_official_calibration
from zsqpipe.zsq.warmup import check_init_rng

KD_REDUCTIONS = ("mean", "batchmean")


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
    if cfg.warmup_iters < 0:
        raise ConfigError(f"{prefix}.warmup_iters: expected >= 0 (0 = iters_per_epoch), got {cfg.warmup_iters}")
    for key in ("epochs", "iters_per_epoch", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{prefix}.{key}: expected a positive integer, got {getattr(cfg, key)}")
    if cfg.batch_size < 2:
        raise ConfigError(f"{prefix}.batch_size: the generator's BatchNorm needs at least 2 samples")


class GeneratorQAT(Method):
    """The GDFQ epoch loop (not registered: a base class); subclasses set ``Config`` and implement the
    generator, its step and the student loss."""

    uses_real_data = False
    synthesizer = None

    def __init__(self, cfg=None):
        super().__init__(cfg)
        check_common(self.cfg, f"methods.{self.name}")

    # --- the parts a method implements ---------------------------------------------------------------------
    def build_generator(self, ctx: QuantContext) -> nn.Module:
        raise NotImplementedError

    def generator_step(self, generator, teacher, bn_stats, optimizer, rng, device):
        """One generator update. Returns (x detached, target, teacher logits on x or None, L_G)."""
        raise NotImplementedError

    def student_loss(self, s_logits, t_logits, target) -> torch.Tensor:
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------------------
    def make_generator_optimizer(self, generator: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in generator.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.cfg.lr_g, betas=(self.cfg.g_beta1, self.cfg.g_beta2))

    def _generator_parts(self, ctx, recorder=None) -> tuple[nn.Module, torch.optim.Optimizer, object, torch.Generator]:
        """The generator (initial weights from the global RNG), its Adam, its LR schedule over every generator
        step (warm-up and fine-tuning) and the ``torch.Generator`` of its latents and labels. ``recorder``:
        notes the RNG state around the generator's construction (generator_warmup job)."""
        c = self.cfg
        with recorder.generator_init() if recorder is not None else contextlib.nullcontext():
            generator = self.build_generator(ctx).to(ctx.device)
        generator.train()
        opt_g = self.make_generator_optimizer(generator)
        total_g = c.warmup_epochs * self.warmup_iters + (c.epochs - c.warmup_epochs) * c.iters_per_epoch
        sched_g = make_scheduler(opt_g, c.schedule, total_g, milestones=c.milestones)
        return generator, opt_g, sched_g, torch.Generator().manual_seed(ctx.seed)

    @property
    def warmup_iters(self) -> int:
        """Generator steps per warm-up epoch."""
        return self.cfg.warmup_iters or self.cfg.iters_per_epoch

    def record_warmup(self, ctx, recorder) -> dict:
        """Train the generator through every warm-up step on the teacher alone (``ctx``: teacher, seed,
        device, num_classes, input_shape), handing each batch to ``recorder.add``; returns the generator's
        state after the last step (what :meth:`run` loads when it replays a recorded warm-up)."""
        generator, opt_g, sched_g, rng = self._generator_parts(ctx, recorder)
        bn_stats = BNStatistics(ctx.teacher)
        try:
            for _ in range(self.cfg.warmup_epochs * self.warmup_iters):
                x, target, _, g_loss = self.generator_step(generator, ctx.teacher, bn_stats, opt_g, rng, ctx.device)
                sched_g.step()
                recorder.add(x, target, g_loss)
        finally:
            bn_stats.remove()
        return {"generator": generator.state_dict(), "optimizer": opt_g.state_dict(),
                "scheduler": sched_g.state_dict(), "rng": rng.get_state()}  # fmt: skip

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        teacher, student = ctx.teacher, ctx.student
        teacher.eval()
        student.eval()  # BN running statistics fixed, affine trained (GDFQ-family trainers)
        recorded = ctx.warmup  # the warm-up recorded by the generator_warmup job: replayed, not trained
        if recorded is not None and recorded.adopt_rng:
            check_init_rng(recorded, self.name)
        generator, opt_g, sched_g, rng = self._generator_parts(ctx)
        self.generator = generator  # kept for inspection (tests)
        warm_iters = self.warmup_iters
        opt_s = make_optimizer(
            student.parameters(), c.optimizer, c.lr, c.momentum, c.weight_decay, c.nesterov
        )
        student_steps = (c.epochs - c.warmup_epochs) * c.iters_per_epoch
        sched_s = make_scheduler(opt_s, c.schedule, max(student_steps, 1), milestones=c.milestones)
        warn_short_official_calibration(student, c.warmup_epochs * warm_iters, ctx.log)
        if recorded is not None and recorded.steps != c.warmup_epochs * warm_iters:
            raise ValueError(f"{self.name}: the recorded warm-up has {recorded.steps} steps, "
                             f"the config needs {c.warmup_epochs * warm_iters}")  # fmt: skip
        start = ctx.resumable(generator=generator, generator_optimizer=opt_g, generator_scheduler=sched_g,
                              optimizer=opt_s, scheduler=sched_s, rng=rng)  # fmt: skip
        bn_stats = BNStatistics(teacher)
        try:
            for epoch in range(start, c.epochs):
                warm = epoch < c.warmup_epochs
                set_quant_state(student, update_ranges=warm)
                sums = {"train_loss": 0.0, "g_loss": 0.0}
                n_iters = warm_iters if warm else c.iters_per_epoch
                for i in range(n_iters):
                    if warm and recorded is not None:
                        x, target, g_loss = recorded.batch(epoch * warm_iters + i, ctx.device)
                        t_logits = None
                    else:
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
                if recorded is not None and epoch == c.warmup_epochs - 1:  # the generator as the warm-up left it
                    generator.load_state_dict(recorded.state["generator"])
                    opt_g.load_state_dict(recorded.state["optimizer"])
                    sched_g.load_state_dict(recorded.state["scheduler"])
                    rng.set_state(recorded.state["rng"])
                    if not recorded.adopt_rng:  # another seed's warm-up: the fine-tuning draws follow the cell's
                        rng.manual_seed(ctx.seed)
                metrics = {k: v / n_iters for k, v in sums.items()}
                metrics.update(
                    lr=opt_s.param_groups[0]["lr"], lr_g=opt_g.param_groups[0]["lr"], warmup=float(warm)
                )
                ctx.end_epoch(epoch, metrics)
                student.eval()
        finally:
            bn_stats.remove()
            set_quant_state(student, update_ranges=False)
