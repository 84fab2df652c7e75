"""``zaq``: Zero-shot Adversarial Quantization (Liu, Zhang, Wang, CVPR 2021).

Follows the official ``FLHonker/ZAQ-code`` ``main.py: train`` and ``utils/loss.py: SCRM`` as described in
``shared/reference/zero-shot-quantization.md`` §2.5 (implemented from that note, no official code copied).
The paper's two-level (output + intermediate-feature) discrepancy and its adversarial min-max game, written
out here (the paper's equation numbers were not checked against its text). Per iteration, with an
unconditional generator G (``ZAQGenerator``), FP model P and quantized model Q:

1. ``q_steps`` (5) Q steps on x = G(z) (no gradient to G):
   L_Q = ||Q(x) - P(x)||_1 (mean over logits) + alpha * SCRM(feats_Q(x), feats_P(x));
2. one G step on a fresh x = G(z), maximising the discrepancy:
   L_G = -||Q(x) - P(x)||_1 - alpha * SCRM - beta * mean|f_P^last(x)|.

SCRM (spatial- and channel-wise relation maps) = sum over feature hook points l of
L1(SA(n(f_Q)), SA(n(f_P))) + L1(CA(n(f_Q)), CA(n(f_P))), with n = L2 normalisation over channels and, for
V = n(f) reshaped to (B, C, N = H*W), the self-attention-style maps (residual weight gamma = 0.1):
   SA(V) = gamma * V softmax_rows(V^T V)^T + V,
   CA(V) = gamma * softmax_rows(max_row(V V^T) - V V^T) V + V.
n divides by the norm where it is non-zero and leaves all-zero vectors at 0 with a finite gradient
(``safe_normalize``; the official ``F.normalize`` gives them a gradient of 1e12, see docs/methods/zaq.md).
Hook points: the outputs of the residual stages (ResNet-20: ``features.stage1..3``, as the official
``ResNet_2.forward(x, out_feat=True)`` returns ``(layer1, layer2, layer3)``; see :func:`default_feature_layers`).

Activation ranges: the official ``QuantAct`` keeps a running global min/max (from 0) that is updated on every
forward and never frozen. Our default (``range_mode: ema``) is the pipeline's standard: EMA ranges during the
first ``calib_epochs`` epochs, frozen afterwards; ``range_mode: minmax`` is the official behaviour (updated on
every *training* forward of Q; never on evaluation data).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import (
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
    Schema,
)
from zsqpipe.engine import make_optimizer, make_scheduler
from zsqpipe.errors import ConfigError
from zsqpipe.methods.base import Method, QuantContext, register_method
from zsqpipe.quant import Quantizer, set_quant_state
from zsqpipe.zsq.generators import ZAQGenerator

RANGE_MODES = ("ema", "minmax")


@dataclass(frozen=True)
class ZAQConfig:
    epochs: PosInt = 2
    iters_per_epoch: PosInt = 6
    batch_size: Annotated[int, Range(ge=2)] = 64
    q_steps: PosInt = 5  # Q steps per G step (hard-coded 5 in the official loop)
    nz: PosInt = 256
    # quantized model Q (official: SGD momentum 0.9, wd 5e-4, no Nesterov)
    optimizer: Optimizer = "sgd"
    # official 0.1 (for 18,000 Q steps); see docs/methods/zaq.md
    lr: Annotated[PosFloat, Doc("official 0.1 (docs/methods/zaq.md)")] = 0.01
    momentum: Prob = 0.9
    nesterov: bool = False
    weight_decay: NonNegFloat = 5e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.333, 0.667)  # schedule "step" (official: epochs 100/200 of 300)
    # generator (official: Adam lr 1e-3, default betas)
    lr_g: PosFloat = 1e-3
    # losses
    alpha: NonNegFloat = 1.0  # SCRM weight
    beta: NonNegFloat = 0.1  # activation-magnitude weight in L_G
    scrm_gamma: NonNegFloat = 0.1  # residual weight of the relation maps
    # False: official F.normalize (1e12 gradients at all-zero vectors)
    safe_normalize: Annotated[
        bool, Doc("false = official F.normalize (1e12 gradients at all-zero feature vectors)")
    ] = True
    # module names; empty = residual stage outputs
    feature_layers: Annotated[
        tuple[str, ...], Schema(items={'type': 'string', 'minLength': 1}), Doc("SCRM hook points; [] = residual stage outputs")
    ] = ()
    # activation ranges and BN mode
    # "ema": EMA for calib_epochs then frozen; "minmax": official running min/max
    range_mode: Annotated[
        str, OneOf("ema", "minmax"), Doc("minmax = official running min/max, never frozen")
    ] = "ema"
    calib_epochs: Annotated[PosInt, Doc("range_mode ema: epochs with range updates")] = 1
    # official q_model.train(): BN of Q uses (and updates) synthetic batch statistics
    bn_train: Annotated[bool, Doc("true = official q_model.train()")] = False


# --- SCRM ---------------------------------------------------------------------------------------------------
def spatial_relation(v: torch.Tensor, gamma: float) -> torch.Tensor:
    """SA for V (B, C, N): each position re-expressed through its softmax affinity to all positions."""
    attn = torch.softmax(v.transpose(1, 2) @ v, dim=-1)  # (B, N, N), rows over the key position
    return gamma * (v @ attn.transpose(1, 2)) + v


def channel_relation(v: torch.Tensor, gamma: float) -> torch.Tensor:
    """CA for V (B, C, N): DANet-style channel attention on max-shifted (inverted) channel affinities."""
    energy = v @ v.transpose(1, 2)  # (B, C, C)
    attn = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
    return gamma * (attn @ v) + v


def channel_normalise(f: torch.Tensor, safe: bool = True) -> torch.Tensor:
    """L2 normalisation over channels (dim 1).

    ``safe=False`` is ``F.normalize(f, dim=1)`` (official): an all-zero channel vector (common in quantized
    post-ReLU features) gets a gradient of 1/eps = 1e12. ``safe=True`` divides by the norm where it is non-zero
    and by 1 where it is zero: the same values (up to norms below 1e-12), finite gradients.
    """
    if not safe:
        return F.normalize(f, dim=1)
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    return f / (norm + (norm == 0).to(norm.dtype))


def scrm_loss(feats_s, feats_t, gamma: float = 0.1, safe: bool = True) -> torch.Tensor:
    """Sum over feature pairs of L1(SA(n(f_s)), SA(n(f_t))) + L1(CA(n(f_s)), CA(n(f_t))) (mean absolute)."""
    total = 0.0
    for fs, ft in zip(feats_s, feats_t, strict=True):
        vs = channel_normalise(fs, safe).flatten(2)
        vt = channel_normalise(ft, safe).flatten(2)
        total = total + F.l1_loss(spatial_relation(vs, gamma), spatial_relation(vt, gamma))
        total = total + F.l1_loss(channel_relation(vs, gamma), channel_relation(vt, gamma))
    return total


# --- feature hook points ------------------------------------------------------------------------------------
def default_feature_layers(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """Residual stage outputs: ``features.stageN`` (CIFAR ResNets), ``layerN`` (torchvision ResNets), else the
    last block of ``model.features`` at each spatial resolution (MobileNetV2), found by a shape probe."""
    names = [n for n, _ in model.named_modules()]
    for pattern in (r"features\.stage\d+", r"layer\d+"):
        found = [n for n in names if re.fullmatch(pattern, n)]
        if found:
            return tuple(found)
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ConfigError("methods.zaq.feature_layers: cannot find residual stages in this model; name them")
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, tuple(out.shape[2:])))
        for n, m in features.named_children()
    ]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    order = [n for n, _ in features.named_children() if n in sizes and len(sizes[n]) == 2]
    return tuple(
        f"features.{n}" for i, n in enumerate(order) if i + 1 == len(order) or sizes[order[i + 1]] != sizes[n]
    )


class FeatureHooks:
    """Forward hooks storing the outputs of the named modules, in the given order."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"methods.zaq.feature_layers: no module named {missing[0]!r} in the model")
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(names)]

    def _hook(self, i: int):
        def hook(_module, _inp, out):
            self.outputs[i] = out

        return hook

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, [None] * len(self.outputs)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class RunningMinMax:
    """The official ZAQ range rule: x_min = min(x_min, batch min), x_max = max(x_max, batch max) from 0, on
    every forward while ``active`` (forward pre-hooks on the activation quantizers; their own EMA stays off)."""

    def __init__(self, model: nn.Module):
        self.quantizers = [m for m in model.modules() if isinstance(m, Quantizer) and hasattr(m, "x_min")]
        self.active = False
        for q in self.quantizers:
            if getattr(q, "num_updates", 1) == 0:
                q.observe(torch.zeros((), device=q.x_min.device))  # range [0, 0], as the official buffers
        self.handles = [q.register_forward_pre_hook(self._hook) for q in self.quantizers]

    @torch.no_grad()
    def _hook(self, q, args):
        if not (self.active and q.active):
            return
        lo, hi = q.batch_range(args[0])  # the batch min/max (``ema_mse``: its MSE-optimal clip)
        q.x_min.copy_(torch.minimum(q.x_min, lo.to(q.x_min.dtype)))
        q.x_max.copy_(torch.maximum(q.x_max, hi.to(q.x_max.dtype)))
        q.num_updates += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients to ``module``'s parameters (inputs still get gradients)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class NonFiniteWatch:
    """Where a run's losses first stop being finite (the iteration, for the student's and the generator's loss;
    per-step losses are not otherwise kept): logged once and put in the epoch's history."""

    def __init__(self, log):
        self.log, self.first, self.last_finite = log, {}, {}

    def see(self, which: str, loss: float, iteration: int) -> None:
        if math.isfinite(loss):
            self.last_finite[which] = loss
        elif which not in self.first:
            self.first[which] = iteration
            self.log(f"zaq: {which} loss not finite from iteration {iteration} on (last finite "
                     f"{self.last_finite.get(which, float('nan')):.4g})")  # fmt: skip

    def metrics(self) -> dict[str, int]:
        """``first_nonfinite_<student|generator>_iter``: the run's iteration (from 0, over all epochs)."""
        return {f"first_nonfinite_{which}_iter": it for which, it in self.first.items()}


@register_method("zaq")
class ZAQ(Method):
    uses_real_data = False
    synthesizer = None
    Config = ZAQConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        c, prefix = self.cfg, f"methods.{self.name}"
        for key in ("epochs", "iters_per_epoch", "q_steps", "nz"):
            if getattr(c, key) < 1:
                raise ConfigError(f"{prefix}.{key}: expected a positive integer, got {getattr(c, key)}")
        if c.batch_size < 2:
            raise ConfigError(f"{prefix}.batch_size: the generator's BatchNorm needs at least 2 samples")
        if c.range_mode not in RANGE_MODES:
            raise ConfigError(
                f"{prefix}.range_mode: expected one of {list(RANGE_MODES)}, got {c.range_mode!r}"
            )
        if c.range_mode == "ema" and not 1 <= c.calib_epochs <= c.epochs:
            raise ConfigError(f"{prefix}.calib_epochs: expected 1..epochs ({c.epochs}), got {c.calib_epochs}")

    # --- the two steps ---------------------------------------------------------------------------------------
    def discrepancy(self, s_logits, t_logits, s_feats, t_feats) -> torch.Tensor:
        """||Q(x) - P(x)||_1 + alpha * SCRM: minimised by Q, maximised by G."""
        c = self.cfg
        return F.l1_loss(s_logits, t_logits) + c.alpha * scrm_loss(
            s_feats, t_feats, c.scrm_gamma, c.safe_normalize
        )

    def _sample(self, generator, rng, device) -> torch.Tensor:
        z = torch.randn(self.cfg.batch_size, generator.nz, generator=rng).to(device)
        return generator(z)

    def q_step(self, generator, teacher, student, hooks_t, hooks_s, optimizer, rng, device) -> float:
        with torch.no_grad():
            x = self._sample(generator, rng, device).contiguous(memory_format=torch.channels_last)
            t_logits = teacher(x)
            t_feats = hooks_t.take()
        s_logits = student(x)
        loss = self.discrepancy(s_logits, t_logits, hooks_s.take(), t_feats)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def g_step(self, generator, teacher, student, hooks_t, hooks_s, optimizer, rng, device) -> float:
        x = self._sample(generator, rng, device).contiguous(memory_format=torch.channels_last)
        t_logits = teacher(x)
        t_feats = hooks_t.take()
        with frozen(student):  # gradients reach x through Q, but Q's weights get none
            s_logits = student(x)
            s_feats = hooks_s.take()
            loss = (
                -self.discrepancy(s_logits, t_logits, s_feats, t_feats)
                - self.cfg.beta * t_feats[-1].abs().mean()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return float(loss.detach())

    # --- the loop ----------------------------------------------------------------------------------------
    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        teacher, student = ctx.teacher, ctx.student
        teacher.eval()
        student.train(c.bn_train)
        generator = ZAQGenerator(tuple(ctx.input_shape), c.nz).to(ctx.device)
        generator.train()
        self.generator = generator  # kept for inspection (tests)
        opt_q = make_optimizer(
            student.parameters(), c.optimizer, c.lr, c.momentum, c.weight_decay, c.nesterov
        )
        sched_q = make_scheduler(
            opt_q, c.schedule, c.epochs * c.iters_per_epoch * c.q_steps, milestones=c.milestones
        )
        opt_g = torch.optim.Adam(generator.parameters(), lr=c.lr_g)
        sched_g = make_scheduler(opt_g, c.schedule, c.epochs * c.iters_per_epoch, milestones=c.milestones)
        names = c.feature_layers or default_feature_layers(teacher, tuple(ctx.input_shape))
        ctx.log(f"zaq: SCRM on {', '.join(names)}")
        hooks_t, hooks_s = FeatureHooks(teacher, names), FeatureHooks(student, names)
        minmax = RunningMinMax(student) if c.range_mode == "minmax" else None
        rng = torch.Generator().manual_seed(ctx.seed)
        args = (generator, teacher, student, hooks_t, hooks_s)
        try:
            start = ctx.resumable(generator=generator, generator_optimizer=opt_g, generator_scheduler=sched_g,
                                  optimizer=opt_q, scheduler=sched_q, rng=rng)  # fmt: skip
            watch = NonFiniteWatch(ctx.log)
            for epoch in range(start, c.epochs):
                self._track_ranges(student, minmax, minmax is not None or epoch < c.calib_epochs)
                q_sum = g_sum = 0.0
                for it in range(c.iters_per_epoch):
                    for _ in range(c.q_steps):
                        q_loss = self.q_step(*args, opt_q, rng, ctx.device)
                        q_sum += q_loss
                        sched_q.step()
                        watch.see("student", q_loss, epoch * c.iters_per_epoch + it)
                    g_loss = self.g_step(*args, opt_g, rng, ctx.device)
                    g_sum += g_loss
                    sched_g.step()
                    watch.see("generator", g_loss, epoch * c.iters_per_epoch + it)
                self._track_ranges(student, minmax, False)  # never on evaluation data
                metrics = {
                    "train_loss": q_sum / (c.iters_per_epoch * c.q_steps),
                    "g_loss": g_sum / c.iters_per_epoch,
                    "lr": opt_q.param_groups[0]["lr"],
                    "lr_g": opt_g.param_groups[0]["lr"],
                    **watch.metrics(),
                }
                ctx.end_epoch(epoch, metrics)
                student.train(c.bn_train)
        finally:
            hooks_t.remove()
            hooks_s.remove()
            self._track_ranges(student, minmax, False)
            if minmax is not None:
                minmax.remove()

    @staticmethod
    def _track_ranges(student, minmax: RunningMinMax | None, on: bool) -> None:
        if minmax is None:
            set_quant_state(student, update_ranges=on)
        else:
            minmax.active = on
