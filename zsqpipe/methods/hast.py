"""``hast``: Hard Sample Matters a Lot in Zero-Shot Quantization (Li et al., CVPR 2023).

Trains on the offline hard samples of the ``hast`` synthesizer (``zsqpipe/zsq/synth_hast.py``, the paper's
L_HIL) and follows the official ``main_direct.py`` / ``trainer_direct.py`` (lihuantong/HAST) as described in
``shared/reference/zero-shot-quantization.md`` §2.4 and §7.1:

1. calibration (official epochs 0-3): a GDFQ generator is trained with CE + 0.1 * BNS on the teacher while the
   quantized student forwards G(z) (detached) with activation ranges updating and no student step; then the
   ranges are frozen and the generator discarded;
2. fine-tuning on the streamed synthetic shards (RandomResizedCrop(0.5, 1) + flip), student in eval mode, per batch x:

       L_S(x) = alpha * T^2 * KL_batchmean(softmax(P(x)/T) || softmax(S(x)/T))                 (L_KL)
                + lambda * sum_{l in residual units} mean((a_l^S(x) - a_l^T(x))^2)              (L_FA)
       a_l = L2-normalise over channels of mean_{H,W}(f_l^2)   (channel attention of unit l's body output)

   sample difficulty promotion (paper: delta = argmax_{||delta||_inf <= eps} d(x + delta; theta_q)) as one FGSM
   step x' = x + eps * sign(grad_x obj), no projection; teacher outputs on x' without gradient; and
   L = L_S(x) + L_S(x') (+ ce_weight * CE on both, 0 in the official code).

``fgsm_objective = "difficulty"`` (default, the paper): obj = mean_i (1 - softmax(S(x_i))_{y_i}), the
difficulty under the quantized model with the sample's synthesis label y. ``"kd_fa"`` (the official code):
obj = L_S(x), the gradient flowing through teacher and student. Defaults for lambda / eps are the official
effective values (1000 / 0.01, hard-coded in ``options.py``; the hocon per-dataset values are never read).
See docs/methods/hast.md for every option and deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import (
    Augment,
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
from zsqpipe.zsq.calibration import CalibrationGenerator, calibrate_with_generator
from zsqpipe.zsq.finetune import ShardStream, check_augment, finetune

FGSM_OBJECTIVES = ("difficulty", "kd_fa")


@dataclass(frozen=True)
class HASTConfig:
    # fine-tuning loop (zsqpipe.zsq.finetune): official 147 x 200 steps, batch 64, SGD lr 1e-5, steps [20, 40, 60]
    epochs: PosInt = 2
    iters_per_epoch: PosInt = 20
    batch_size: PosInt = 64
    optimizer: Optimizer = "sgd"
    lr: PosFloat = 2.5e-4  # x kd_alpha 20 = 0.005, the `real` step (docs/budget.md); official 1e-5 for 147 x 200 steps
    momentum: Prob = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Schedule = "cosine"
    milestones: Milestones = (0.5, 0.75)  # schedule "step": LR x 0.1 at these fractions of training
    augment: Augment = "rrc"  # rrc (official RandomResizedCrop(0.5, 1) + flip) | crop_flip (pad-crop + flip) | none
    # RandomResizedCrop scale lower bound (official 0.5)
    aug_margin: Annotated[float, Range(gt=0, le=1)] = 0.5
    bn_train: bool = False  # official: student in eval mode (BN running statistics fixed)
    # losses
    kd_alpha: NonNegFloat = 20.0  # alpha (official 20)
    kd_temperature: PosFloat = 20.0  # T (official 20): L_KL = alpha * T^2 * KL_batchmean = 8000 * KL
    fa_weight: NonNegFloat = 1000.0  # lambda; official effective (options.py); hocon C100 2000, ImageNet 4000
    ce_weight: NonNegFloat = 0.0  # CE(S(x), y) with the synthesis label; official: computed, not used (0)
    # ablation switches (paper Table: HSS, SDP, FA)
    difficulty_promotion: bool = True  # SDP: add L_S(x') on the FGSM copy x'
    feature_alignment: bool = True  # FA: the L_FA term
    fgsm_eps: NonNegFloat = 0.01  # official effective (options.py); hocon C100 0.02
    # "difficulty" (paper: 1 - p under S) or "kd_fa" (official code)
    fgsm_objective: Annotated[str, OneOf(*FGSM_OBJECTIVES)] = "difficulty"
    # calibration with a GDFQ generator (official: 4 epochs x 200 iterations, batch 16)
    calib_iters: PosInt = 200  # converged at W3A3 (hast_calib: 50 -> 200 +4.0 points, 800 no better)
    calib_batch_size: PosInt = 16
    generator_lr: PosFloat = 1e-3
    generator_latent_dim: PosInt = 100
    generator_bns_weight: NonNegFloat = 0.1

    def __post_init__(self):
        check_augment(self, "hast")
        if self.fgsm_objective not in FGSM_OBJECTIVES:
            raise ConfigError(
                f"methods.hast.fgsm_objective: expected one of {list(FGSM_OBJECTIVES)}, got {self.fgsm_objective!r}"
            )


# ---------------------------------------------------------------------------------------------- losses


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): mean over H, W of f^2, L2-normalised over channels."""
    return F.normalize(f.float().pow(2).mean(dim=(2, 3)), dim=1)


def attention_loss(student_feats, teacher_feats) -> torch.Tensor:
    """sum_l mean((a_l^S - a_l^T)^2) over matching feature maps (unweighted; lambda is applied by the caller)."""
    total = 0.0
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        total = total + (channel_attention(fs) - channel_attention(ft)).pow(2).mean()
    return total


def difficulty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean sample difficulty d = 1 - softmax(logits)[label] (the paper's d(x; theta))."""
    return 1.0 - F.softmax(logits, dim=1).gather(1, labels[:, None]).mean()


def fgsm_step(objective: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x' = x + eps * sign(d objective / d x), detached; the graph of ``objective`` is kept for later use."""
    (grad,) = torch.autograd.grad(objective, x, retain_graph=True)
    return (x + eps * grad.sign()).detach()


# ------------------------------------------------------------------------------------- feature hooks


def feature_points(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are aligned: the residual branch of every residual unit.

    - zsqpipe/pytorchcv ResNet-20 (``ResUnit.body``, a ``ResBlock``): the ``*.body`` modules, as the official code;
    - torchvision ResNet ``BasicBlock`` / ``Bottleneck``: ``bn2`` / ``bn3`` (the residual branch before the add,
      the same tensor as pytorchcv's ``ResUnit.body`` output);
    - torchvision MobileNetV2 ``InvertedResidual``: the last module of ``conv`` (the projection conv's BN), the
      counterpart of pytorchcv ``LinearBottleneck.conv3`` (conv + BN); every block, with or without a skip.
    """
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from zsqpipe.models.resnet_cifar import ResBlock

    names = []
    for name, m in model.named_modules():
        if isinstance(m, ResBlock) and name.rsplit(".", 1)[-1] == "body":
            names.append(name)
        elif isinstance(m, BasicBlock):
            names.append(f"{name}.bn2")
        elif isinstance(m, Bottleneck):
            names.append(f"{name}.bn3")
        elif isinstance(m, InvertedResidual):
            names.append(f"{name}.conv.{len(m.conv) - 1}")
    return names


class FeatureHooks:
    """Keeps the latest output of each named module (overwritten every forward, so memory stays bounded)."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"hast: feature point {missing[0]!r} not found in the model")
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        # torchvision's Bottleneck adds the shortcut to bn3's output in place (`out += identity`), which would
        # turn the stored residual branch into the block output: keep a copy there (the official code clones
        # every feature; elsewhere the output is not modified afterwards, so no copy is needed)
        from torchvision.models.resnet import Bottleneck

        parents = {n: modules.get(n.rpartition(".")[0]) for n in names}
        self.handles = [
            modules[n].register_forward_hook(self._hook(i, isinstance(parents[n], Bottleneck)))
            for i, n in enumerate(names)
        ]

    def _hook(self, i: int, copy: bool):
        def hook(_m, _inp, out):
            self.outputs[i] = out.clone() if copy else out

        return hook

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = list(self.outputs), [None] * len(self.outputs)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------- method


@register_method("hast")
class HAST(Method):
    uses_real_data = False
    synthesizer = "hast"
    Config = HASTConfig

    def run(self, ctx: QuantContext) -> None:
        c = self.cfg
        if ctx.samples is None:
            raise ValueError("hast: no synthetic samples (ctx.samples) to fine-tune on")
        student, teacher = ctx.student, ctx.teacher
        teacher.eval()
        gen = CalibrationGenerator(c.calib_iters, c.calib_batch_size, c.generator_lr, c.generator_latent_dim,
                                   c.generator_bns_weight)  # fmt: skip
        calibrate_with_generator(ctx.student, ctx.teacher, ctx.num_classes, ctx.input_shape, gen, ctx.seed, ctx.device,
                                 ctx.log, "hast", warmup=ctx.warmup)  # fmt: skip

        hooks_s = hooks_t = None
        if c.feature_alignment:
            names = feature_points(teacher)
            if not names:
                raise ValueError(
                    "hast: feature_alignment found no residual unit to hook in this architecture"
                )
            hooks_t, hooks_s = FeatureHooks(teacher, names), FeatureHooks(student, names)
            ctx.log(f"hast: feature alignment on {len(names)} units ({names[0]} ... {names[-1]})")
        batches = ShardStream(ctx, c.batch_size, ctx.seed, c.augment, c.aug_margin)

        def student_loss(s_logits, s_feats, t_logits, t_feats, y):
            loss = c.kd_alpha * kd_kl(s_logits, t_logits, c.kd_temperature)
            if c.feature_alignment:
                loss = loss + c.fa_weight * attention_loss(s_feats, t_feats)
            if c.ce_weight:
                loss = loss + c.ce_weight * F.cross_entropy(s_logits, y)
            return loss

        def forward(model, hooks, x):
            logits = model(x)
            return logits, (hooks.take() if hooks is not None else None)

        def teacher_no_grad(x):
            with torch.no_grad():
                return forward(teacher, hooks_t, x)

        def step(_it: int) -> torch.Tensor:
            x, y = next(batches)
            if not c.difficulty_promotion:
                s = forward(student, hooks_s, x)
                return student_loss(*s, *teacher_no_grad(x), y)
            x.requires_grad_(True)
            s = forward(student, hooks_s, x)
            if c.fgsm_objective == "kd_fa":  # official: signed gradient of L_S(x) through teacher and student
                t = forward(teacher, hooks_t, x)
                x_adv = fgsm_step(student_loss(*s, *t, y), x, c.fgsm_eps)
                t = (t[0].detach(), [f.detach() for f in t[1]] if t[1] is not None else None)
            else:  # paper: increase the difficulty 1 - p under the quantized model
                x_adv = fgsm_step(difficulty(s[0], y), x, c.fgsm_eps)
                t = teacher_no_grad(x)
            loss = student_loss(*s, *t, y)
            s_adv = forward(student, hooks_s, x_adv)
            return loss + student_loss(*s_adv, *teacher_no_grad(x_adv), y)

        student.train(c.bn_train)  # evaluate() in ctx.end_epoch restores this mode after each epoch
        try:
            finetune(ctx, c, step, stateful={"batches": batches})
        finally:
            for h in (hooks_s, hooks_t):
                if h is not None:
                    h.remove()
