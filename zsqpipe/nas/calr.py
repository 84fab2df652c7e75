"""DYNAS supernet-training pieces: subnet complexity, complexity-aware LR (CaLR), momentum separation (MS),
SPOS uniform sampling, and the supernet-training config.

Jeon, Oh, Lee, Baek, Kim, Eom, Ham, "Subnet-Aware Dynamic Supernet Training for Neural Architecture Search"
(CVPR 2025, arXiv 2503.10740); behaviour follows the official NB201 code (``train_spos.py``,
``utils/LR_scheduler.py``, ``utils/get_num_params.py``), re-implemented here. docs/methods/supernet.md has
the equations, sources and choices. In short, for a subnet alpha at iteration t of T:

    C(alpha)   analytic weight count of the subnet (conv/linear weights; only conv1x1/conv3x3 edges vary)
    gamma      = w ln C(alpha) + tau,  gamma(C_min) = gamma_max,  gamma(C_max) = 1 / gamma_max
    lr(t)      = lr0 (1 - t/T)^gamma                          (CaLR; baseline: lr0 (1 + cos(pi t/T)) / 2)
    MS         one SGD state (momentum buffer, LR) per op of a split edge e*; the subnet's op on e* picks it
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from zsqpipe.config import ConfigBase, Doc, Momentum, NonNegFloat, OneOf, PosFloat, PosInt, Range
from zsqpipe.errors import ConfigError
from zsqpipe.names import SUPERNET_METHOD_NAMES
from zsqpipe.nas.spaces.nb201 import (
    NUM_ARCHS,
    NUM_EDGES,
    OPS,
    Arch,
    index_to_arch,
    str_to_arch,
    validate_arch,
)

METHODS = SUPERNET_METHOD_NAMES
COMPLEXITY_SPACES = ("model", "nb201")
SUMMED_LR = ("cosine", "calr")  # the baseline's LR sum: its own, or matched to CaLR's (SupernetConfig.summed_lr)
SHARED = "shared"  # the single optimizer group when momentum separation is off


def as_arch(arch: Arch | Sequence[str] | str | int) -> Arch:
    """An NB201 cell as a tuple of 6 op names, from a tuple/list, an NB201 string or a base-5 table index."""
    if isinstance(arch, str):
        return str_to_arch(arch)
    if isinstance(arch, int) and not isinstance(arch, bool):
        return index_to_arch(arch)
    return validate_arch(tuple(arch))


# ----------------------------------------------------------------------------------------------------------
# Complexity


def subnet_complexity(
    arch: Arch | str | int, C: int = 16, N: int = 5, in_channels: int = 3, num_classes: int = 10
) -> int:
    """Weight count of the NB201 subnet ``arch`` in the macro skeleton (C, N), as DYNAS'
    ``get_num_params`` counts it: conv and linear *weights* only (no biases, no BN), and only conv1x1 and
    conv3x3 edges depend on the cell. With C=16, N=5, 3 input channels and 10 classes this is exactly the
    official formula 432 + 26880 n_1x1 + 241920 n_3x3 + 71680 + 640 (C_min 72,752; C_max 1,524,272).
    Other sizes generalise each term (stem 9*in*C, cells N*(C^2+(2C)^2+(4C)^2) per 1x1 edge, 9x that per
    3x3 edge, the two ResNet reduction blocks, the classifier 4C*classes)."""
    ops = as_arch(arch)
    stem = 9 * in_channels * C
    per_1x1 = N * (C**2 + (2 * C) ** 2 + (4 * C) ** 2)
    cells = per_1x1 * ops.count("nor_conv_1x1") + 9 * per_1x1 * ops.count("nor_conv_3x3")
    # ResNet basic block c_in -> 2 c_in, stride 2: conv3x3 a, conv3x3 b, avgpool + conv1x1 shortcut
    reduction = sum(9 * (c * 2 * c + (2 * c) ** 2) + c * 2 * c for c in (C, 2 * C))
    fc = 4 * C * num_classes
    return stem + cells + reduction + fc


SMALLEST: Arch = ("none",) * NUM_EDGES  # DYNAS: struc[0]
LARGEST: Arch = ("nor_conv_3x3",) * NUM_EDGES  # DYNAS: struc[11718]


# ----------------------------------------------------------------------------------------------------------
# CaLR


def calr_factor(t: int, total: int, gamma: float) -> float:
    """CaLR multiplier of the base LR at iteration ``t`` (0-based) of ``total``: (1 - t/T)^gamma."""
    p = min(max(t / max(total, 1), 0.0), 1.0)
    return (1.0 - p) ** gamma


def cosine_factor(t: int, total: int) -> float:
    """Baseline multiplier (CosineAnnealingLR to 0, stepped per iteration): (1 + cos(pi t/T)) / 2."""
    p = min(max(t / max(total, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


class CaLR:
    """gamma(alpha) = w ln C(alpha) + tau, with w and tau fixed so that the smallest subnet gets
    ``gamma_max`` (fast decay) and the largest ``1/gamma_max`` (the LR stays high longer):

        w   = -(gamma_max - gamma_min) / (ln C_max - ln C_min)
        tau = gamma_min - w ln C_max,          gamma_min = 1 / gamma_max
    """

    def __init__(
        self,
        gamma_max: float = 4.0,
        C: int = 16,
        N: int = 5,
        in_channels: int = 3,
        num_classes: int = 10,
    ):
        if not gamma_max >= 1.0:
            raise ConfigError(f"supernet.gamma_max: expected a number >= 1, got {gamma_max!r}")
        self.space = {"C": C, "N": N, "in_channels": in_channels, "num_classes": num_classes}
        self.gamma_max = float(gamma_max)
        self.gamma_min = 1.0 / self.gamma_max
        self.c_min = subnet_complexity(SMALLEST, **self.space)
        self.c_max = subnet_complexity(LARGEST, **self.space)
        self.w = -(self.gamma_max - self.gamma_min) / (math.log(self.c_max) - math.log(self.c_min))
        self.tau = self.gamma_min - self.w * math.log(self.c_max)

    @classmethod
    def for_model(cls, model, gamma_max: float = 4.0) -> CaLR:
        """For a :class:`zsqpipe.nas.supernet201.NB201Supernet` (reads its C, N, channels and classes)."""
        return cls(gamma_max, model.C, model.N, model.in_channels, model.num_classes)

    def complexity(self, arch: Arch | str | int) -> int:
        return subnet_complexity(arch, **self.space)

    def gamma(self, arch: Arch | str | int) -> float:
        return self.w * math.log(self.complexity(arch)) + self.tau

    def factor(self, arch: Arch | str | int, t: int, total: int) -> float:
        return calr_factor(t, total, self.gamma(arch))


def calr_matched_scale(calr: CaLR, archs: Sequence[Arch]) -> float:
    """The constant c for which sum_t c * cosine(t) = sum_t CaLR(alpha_t, t) over the subnets ``archs`` of a
    run (one per iteration, T = len(archs)): the summed-LR-matched baseline (``summed_lr: calr``)."""
    total = len(archs)
    calr_sum = sum(calr.factor(a, t, total) for t, a in enumerate(archs))
    return calr_sum / sum(cosine_factor(t, total) for t in range(total))


# ----------------------------------------------------------------------------------------------------------
# Momentum separation


class GroupedSGD:
    """A set of ``torch.optim.SGD`` optimizers over the *same* parameters, one per group key, so each group
    has its own momentum buffers and its own LR. ``step(g)`` updates the parameters with group g's state only;
    the other groups' buffers are untouched.

    DYNAS' MS: groups = the 5 ops of the split edge e*, and a subnet uses the group of its op on e*
    (``ms_groups`` / ``group_of``). Without MS there is one group, ``SHARED``. As in the official code every
    group covers every parameter (the whole supernet's momentum is separated, not only e*'s weights)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        groups: Sequence[str],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params or not groups:
            raise ConfigError("GroupedSGD: needs at least one trainable parameter and one group")
        self.groups = tuple(groups)
        self.optimizers = {
            g: torch.optim.SGD(
                self.params,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov and momentum > 0,
            )
            for g in self.groups
        }
        self.steps = dict.fromkeys(self.groups, 0)

    def set_lr(self, group: str, lr: float) -> None:
        for pg in self.optimizers[group].param_groups:
            pg["lr"] = lr

    def lr(self, group: str) -> float:
        return self.optimizers[group].param_groups[0]["lr"]

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Gradients are shared by all groups. ``set_to_none=False`` (default) reproduces the official
        torch-1.8 behaviour: parameters of ops outside the current subnet keep a zero gradient, so SGD's
        weight decay and momentum still move them (with ``True`` they are skipped)."""
        self.optimizers[self.groups[0]].zero_grad(set_to_none=set_to_none)

    def step(self, group: str) -> None:
        self.optimizers[group].step()
        self.steps[group] += 1

    def momentum_buffer(self, group: str, param: torch.nn.Parameter) -> torch.Tensor | None:
        return self.optimizers[group].state.get(param, {}).get("momentum_buffer")

    def state_dict(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "steps": dict(self.steps),
            "optimizers": {g: o.state_dict() for g, o in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["groups"]) != list(self.groups):
            raise ConfigError(f"GroupedSGD: state has groups {state['groups']}, expected {list(self.groups)}")
        for g, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][g])
        self.steps = {g: int(state["steps"][g]) for g in self.groups}


def ms_groups(ms: bool) -> tuple[str, ...]:
    return OPS if ms else (SHARED,)


def group_of(arch: Arch, split_edge: int | None) -> str:
    """The optimizer group of ``arch``: its op on the split edge (MS), or ``SHARED`` (``split_edge=None``)."""
    return SHARED if split_edge is None else arch[split_edge]


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_arch(rng: random.Random) -> Arch:
    """SPOS uniform sampling over all 15,625 cells (the official ``random.randrange(15625)``)."""
    return index_to_arch(rng.randrange(NUM_ARCHS))


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SupernetConfig(ConfigBase):
    """Supernet training (and evaluation) recipe. Defaults are the DYNAS NB201/SPOS ones.

    method: ``spos`` (uniform single-path sampling, cosine LR, one optimizer) or ``spos_calr_ms`` (DYNAS:
    SPOS + CaLR + MS). ``calr`` / ``ms``: null = as ``method`` says; true/false overrides it (ablations,
    e.g. CaLR only). summed_lr (without CaLR): ``cosine`` = the plain cosine schedule; ``calr`` = the cosine
    schedule scaled by one constant so that the LR summed over the run equals what CaLR gives the same subnet
    sequence (:func:`calr_matched_scale`): a control that separates CaLR's per-subnet shaping from its smaller
    total step. gamma_max: CaLR's gamma_max (``--max_coeff``, default 4). calr_complexity: ``model``
    = C(alpha) counted in the trained supernet (its C, N, input channels, classes); ``nb201`` = the official
    constants (C=16, N=5, 3 channels, 10 classes) whatever the supernet's size. epochs x iters = T, the
    schedule length (iters null = the loader's length per epoch; DYNAS: 391). lr, momentum, nesterov, wd,
    grad_clip: SGD (0.025, 0.9, true, 5e-4, clip-norm 5). batch_size / eval_batch_size: 64 / 256.
    augment: random crop + flip of the training batches (DYNAS: the CIFAR augmentation). eval_images: the
    first N images of the validation split that score each subnet (null = all; DYNAS: the 25k valid half). C, N:
    supernet width and cells per stage (16, 5). split_edge: MS's split edge (null = drawn from the seed,
    once per run). bn_track_running_stats: false = DYNAS (BN without running statistics: batch statistics
    in training and evaluation, no recalibration); true = running statistics, recalibrated per subnet
    over ``bn_batches`` training batches before evaluation (SPOS-paper style). zero_grad_to_none: false =
    the official torch-1.8 semantics (inactive ops keep zero gradients and still get weight decay and
    momentum)."""

    prefix = "supernet"  # how its errors name keys (ConfigBase.from_dict renames)

    method: str = "spos"
    calr: Annotated[bool | None, Doc("null = as the method says; true/false overrides (ablations)")] = None
    ms: Annotated[bool | None, Doc("null = as the method says; true/false overrides (ablations)")] = None
    summed_lr: Annotated[
        str,
        OneOf(*SUMMED_LR),
        Doc("without CaLR: 'calr' scales the cosine LR so its sum over the run equals CaLR's for the same subnets (a control)"),
    ] = "cosine"
    gamma_max: Annotated[float, Range(ge=1), Doc("CaLR's gamma_max (--max_coeff)")] = 4.0
    calr_complexity: Annotated[str, OneOf(*COMPLEXITY_SPACES)] = "model"
    epochs: PosInt = 250
    iters: Annotated[
        PosInt | None, Doc("iterations per epoch (T = epochs x iters); null = a full pass over the training split")
    ] = None
    lr: PosFloat = 0.025
    momentum: Momentum = 0.9
    nesterov: bool = True
    wd: NonNegFloat = 5e-4
    grad_clip: PosFloat | None = 5.0
    batch_size: PosInt = 64
    eval_batch_size: Annotated[
        PosInt, Doc("BN uses batch statistics at evaluation (DYNAS): accuracies depend on it")
    ] = 256
    augment: Annotated[bool, Doc("random crop + flip (DYNAS: CIFAR augmentation)")] = True
    eval_images: Annotated[
        PosInt | None, Doc("first N validation images that score each cell; null = the whole validation split")
    ] = None
    C: Annotated[PosInt, Doc("channels of the first stage (then 2C, 4C)")] = 16
    N: Annotated[PosInt, Doc("cells per stage")] = 5
    seed: int = 0
    split_edge: Annotated[
        int | None, Range(ge=0, le=5), Doc("MS split edge; null = drawn from the seed")
    ] = None
    bn_track_running_stats: bool = False
    bn_batches: PosInt = 10
    zero_grad_to_none: bool = False

    def __post_init__(self):
        p = "supernet"
        if self.method not in METHODS:
            raise ConfigError(f"{p}.method: expected one of {list(METHODS)}, got {self.method!r}")
        if self.calr_complexity not in COMPLEXITY_SPACES:
            raise ConfigError(
                f"{p}.calr_complexity: expected one of {list(COMPLEXITY_SPACES)}, got {self.calr_complexity!r}"
            )
        if not self.gamma_max >= 1.0:
            raise ConfigError(f"{p}.gamma_max: expected a number >= 1, got {self.gamma_max!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "C", "N", "bn_batches"):
            v = getattr(self, key)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected an integer >= 1, got {v!r}")
        for key in ("iters", "eval_images"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected null or an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ConfigError(f"{p}.lr: expected a positive number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{p}.momentum: expected a number in [0, 1), got {self.momentum!r}")
        if not self.wd >= 0:
            raise ConfigError(f"{p}.wd: expected a number >= 0, got {self.wd!r}")
        if self.summed_lr not in SUMMED_LR:
            raise ConfigError(f"{p}.summed_lr: expected one of {list(SUMMED_LR)}, got {self.summed_lr!r}")
        if self.summed_lr == "calr" and self.use_calr:
            raise ConfigError(f"{p}.summed_lr: 'calr' is a control for runs without CaLR (calr is on)")
        for key in ("calr", "ms"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, bool):
                raise ConfigError(f"{p}.{key}: expected null, true or false, got {v!r}")
        if not isinstance(self.augment, bool):
            raise ConfigError(f"{p}.augment: expected true or false, got {self.augment!r}")
        gc = self.grad_clip
        if gc is not None and not (isinstance(gc, int | float) and not isinstance(gc, bool) and gc > 0):
            raise ConfigError(f"{p}.grad_clip: expected null or a positive number, got {self.grad_clip!r}")
        se = self.split_edge
        if se is not None and not (
            isinstance(se, int) and not isinstance(se, bool) and se in range(NUM_EDGES)
        ):
            raise ConfigError(
                f"{p}.split_edge: expected null or an integer 0..{NUM_EDGES - 1}, got {self.split_edge!r}"
            )

    @property
    def use_calr(self) -> bool:
        return self.method == "spos_calr_ms" if self.calr is None else bool(self.calr)

    @property
    def use_ms(self) -> bool:
        return self.method == "spos_calr_ms" if self.ms is None else bool(self.ms)

    def resolved_split_edge(self) -> int | None:
        """MS's split edge: ``split_edge``, else drawn once from the seed by its own generator (so the
        subnet sequence is the same with and without MS); None when MS is off."""
        if not self.use_ms:
            return None
        if self.split_edge is not None:
            return self.split_edge
        return random.Random(f"split-edge-{self.seed}").randrange(NUM_EDGES)

    def make_calr(self, model=None, matched: bool = False) -> CaLR | None:
        """The CaLR exponents for ``model`` (None when CaLR is off; with ``matched``, also those the
        ``summed_lr: calr`` control matches)."""
        if not (self.use_calr or (matched and self.summed_lr == "calr")):
            return None
        if self.calr_complexity == "nb201" or model is None:
            return CaLR(self.gamma_max)
        return CaLR.for_model(model, self.gamma_max)
