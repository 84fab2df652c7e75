"""``real``: quantization-aware fine-tuning on the real training set with knowledge distillation.

The upper bound that every zero-shot table compares to. Same harness as the GDFQ family:
1. calibration: ``calib_batches`` forward passes on training batches with activation ranges updating and no
   weight update (GDFQ's warm-up epochs), then ranges are frozen;
2. fine-tuning: ``epochs`` x ``iters_per_epoch`` SGD steps on
   L = ce_weight * CE(S(x), y) + kd_weight * T^2 * KL(softmax(P(x)/T) || softmax(S(x)/T))  (batchmean),
   with the student in eval mode (BN uses its running statistics; its affine parameters train), as in the
   GDFQ/IntraQ/HAST trainers.
After every epoch the student is evaluated on the validation split and on the test set.

Options from the QAT-technique papers (issue 5): ``talr`` (a dict of :class:`zsqpipe.quant.talr.TALRConfig`,
``{}`` = paper defaults) replaces the learning rate of the quantized layers' latent weights by the
transition-adaptive one (docs/methods/talr.md); ``grad_quant`` (a dict of
:class:`zsqpipe.gradquant.GradQuantConfig`, e.g. ``{bits: 4}``) quantizes the output gradient of every
quantized layer with LBT's adaptive clipping interval (docs/methods/lbt.md). Both default to off.

TALR's controls (docs/methods/talr.md): ``latent_lr_from`` names the TALR cell (a method or variant of the same
dataset, arch, bits and seed) whose summed latent-weight LR per layer (``summary.talr.lr_sum`` of its
history.json, given to the stage as ``--lr-reference``) this run matches: each quantized layer's latent weights get
``schedule`` scaled so that sum_t lr_t equals that layer's sum_t U^t; every other parameter keeps ``lr``.
``latent_schedule`` gives the matched latent weights their own schedule shape (e.g. ``constant``: the sum spread
evenly) while every other parameter keeps ``schedule``; ``freeze_weight_scales`` stops training the weight
quantizers' step sizes, as TALR does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from zsqpipe.config import (
    Doc,
    Milestones,
    Nested,
    NonNegFloat,
    OneOf,
    Optimizer,
    PosFloat,
    PosInt,
    Prob,
    Schedule,
)
from zsqpipe.data.loaders import endless
from zsqpipe.engine import kd_kl, lr_factor, make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.gradquant import GradQuantConfig, enable_grad_quant
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.progress import progress
from zsqpipe.quant.talr import TALR, TALRConfig, freeze_weight_scales, group_layer, talr_param_groups
from zsqpipe.zsq.calibration import calibrate


@dataclass(frozen=True)
class RealConfig:
    epochs: PosInt = 2
    iters_per_epoch: PosInt = 20
    batch_size: PosInt = 128
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 0.005
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    calib_batches: PosInt = 8
    kd_temperature: PosFloat = 4.0
    kd_weight: NonNegFloat = 1.0
    ce_weight: NonNegFloat = 1.0
    bn_train: bool = False
    # TALRConfig fields; None = ordinary LR schedule
    talr: Annotated[
        dict[str, Any] | None, Nested("zsqpipe.quant.talr:TALRConfig"), Doc("transition-adaptive LR for the latent weights (docs/methods/talr.md); {} = paper defaults")
    ] = None
    # GradQuantConfig fields; None = FP gradients
    grad_quant: Annotated[
        dict[str, Any] | None, Nested("zsqpipe.gradquant:GradQuantConfig"), Doc("LBT gradient quantization (docs/methods/lbt.md), e.g. {bits: 4}; null = FP gradients")
    ] = None

    latent_lr_from: Annotated[
        str | None, Doc("TALR control: the TALR cell (method or variant name) whose summed latent LR per layer this run matches with `schedule` (docs/methods/talr.md); null = off")
    ] = None
    latent_schedule: Annotated[
        str | None, OneOf("cosine", "step", "constant"), Doc("the matched control's schedule for the latent weights (null = `schedule`); every other parameter keeps `schedule`")
    ] = None
    freeze_weight_scales: Annotated[
        bool, Doc("stop training the weight quantizers' step sizes (TALR does; its LR-matched control should too)")
    ] = False

    def __post_init__(self):  # one-line errors at construction, not mid-run
        if self.latent_lr_from is not None and self.talr is not None:
            raise ConfigError("methods.real.latent_lr_from: a TALR run (talr set) cannot also match another's LR")
        if self.latent_lr_from is not None and (self.latent_schedule or self.schedule) == "onecycle":
            raise ConfigError("methods.real.latent_schedule: the LR-matched control needs cosine, step or constant "
                              "for the latent weights, got onecycle")  # fmt: skip
        self.talr_config()
        self.grad_quant_config()

    def talr_config(self) -> TALRConfig | None:
        return None if self.talr is None else TALRConfig.from_dict(self.talr, prefix="methods.real.talr")

    def grad_quant_config(self) -> GradQuantConfig:
        return GradQuantConfig.from_dict(self.grad_quant or {}, prefix="methods.real.grad_quant")


@register_method("real")
class RealData(Method):
    uses_real_data = True
    Config = RealConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        batches = endless(ctx.train_loader_factory(c.batch_size, ctx.seed))
        student, teacher = ctx.student, ctx.teacher
        student.eval()
        calibrate(student, batches, c.calib_batches, ctx.log)
        student.train(c.bn_train)
        steps = c.epochs * c.iters_per_epoch
        talr_cfg = c.talr_config()
        group_factors = None
        if talr_cfg is not None:
            params = talr_param_groups(student, talr_cfg.scope)
        elif c.latent_lr_from is not None:
            params, latent = matched_latent_groups(student, ctx.lr_reference, c, steps)
            group_factors = {i: latent for i, g in enumerate(params) if group_layer(g)}
        else:
            params = student.parameters()
        if c.freeze_weight_scales:
            freeze_weight_scales(student)
        opt = make_optimizer(params, c.optimizer, c.lr, c.momentum, c.weight_decay, c.nesterov)
        sched = make_scheduler(opt, c.schedule, steps, milestones=c.milestones, group_factors=group_factors)
        talr = TALR(opt, student, steps, talr_cfg) if talr_cfg is not None else None
        grads = enable_grad_quant(student, c.grad_quant_config())
        start = ctx.resumable(optimizer=opt, scheduler=sched, batches=batches, talr=talr, grad_quant=grads)
        for epoch in range(start, c.epochs):
            total = 0.0
            for _ in progress(range(c.iters_per_epoch), desc=f"epoch {epoch + 1}/{c.epochs}"):
                x, y = next(batches)
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
                loss = c.ce_weight * F.cross_entropy(s_logits, y) + c.kd_weight * kd_kl(
                    s_logits, t_logits, c.kd_temperature
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                (talr or opt).step()  # TALR sets the latent weights' LR to U before the step
                grads.update_intervals()
                sched.step()
                total += float(loss.detach())
            extra = {"train_loss": total / c.iters_per_epoch, "lr": opt.param_groups[-1]["lr"]}
            if talr is not None:
                st = list(talr.stats().values())
                extra.update(
                    {f"talr_{k}_mean": sum(s[k] for s in st) / len(st) for k in ("k", "K", "R", "U")}
                )
            if grads.layers:
                gam = list(grads.gammas().values())
                extra["grad_gamma_mean"] = sum(gam) / len(gam)
            ctx.end_epoch(epoch, extra)
            student.train(c.bn_train)
        grads.remove()
        if talr is not None:
            ctx.summary["talr"] = talr.summary()
            ctx.summary["latent"] = {"lr_sum_mean": ctx.summary["talr"]["lr_sum_mean"]}
        elif c.latent_lr_from is not None:
            sums = {group_layer(g): g["matched_lr_sum"] for g in opt.param_groups if "matched_lr_sum" in g}
            ctx.summary["latent"] = {"matched_to": c.latent_lr_from, "lr_sum": sums,
                                     "lr_sum_mean": sum(sums.values()) / len(sums)}  # fmt: skip
        else:
            ctx.summary["latent"] = {"lr_sum_mean": c.lr * schedule_sum(c.schedule, steps, c.milestones)}


def schedule_sum(name: str, steps: int, milestones=()) -> float:
    """sum_t of the LR factor of schedule ``name`` over ``steps`` steps (the LR a step of lr 1 adds up to), as
    :func:`zsqpipe.engine.make_scheduler` applies it."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, name, steps, milestones=milestones)
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return total


def matched_latent_groups(student, reference: dict | None, c: RealConfig, steps: int) -> tuple[list[dict], Any]:
    """(groups, factor): one parameter group per quantized layer whose LR over ``steps`` steps of the latent
    schedule (``c.latent_schedule``, else ``c.schedule``; ``factor`` = its per-step multiplier) sums to the
    reference TALR run's sum_t U^t for that layer (``reference``: its history's ``summary``), then the rest."""
    key = "methods.real.latent_lr_from"
    if reference is None or "talr" not in reference:
        raise ConfigError(f"{key}: {c.latent_lr_from!r} needs that cell's history.json with a TALR summary "
                          "(quantize --lr-reference)")  # fmt: skip
    if reference["talr"].get("steps") != steps:
        raise ConfigError(f"{key}: the reference TALR run trained {reference['talr'].get('steps')} steps, this run "
                          f"{steps} (epochs x iters_per_epoch must match)")  # fmt: skip
    sums = reference["talr"]["lr_sum"]
    groups = talr_param_groups(student, "layer")
    latent = [(name, g) for g in groups if (name := group_layer(g))]
    if sorted(name for name, _ in latent) != sorted(sums):
        raise ConfigError(
            f"{key}: the reference's TALR layers {sorted(sums)} are not this model's quantized layers "
            f"{sorted(name for name, _ in latent)} (per-layer TALR scope, same arch and bits expected)"
        )
    schedule = c.latent_schedule or c.schedule
    per_step = schedule_sum(schedule, steps, c.milestones)
    for name, g in latent:
        g["matched_lr_sum"] = sums[name]
        g["lr"] = g["matched_lr_sum"] / per_step
    return groups, lr_factor(schedule, steps, milestones=c.milestones)
