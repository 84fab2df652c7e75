"""OQAT on the NAS-Bench-201 space (default) or the OFA / MobileNetV3 space (``space: ofa_mbv3``,
docs/methods/ofa_space.md): a quantized weight-sharing supernet with shared LSQ step sizes, bit
inheritance, BN recalibration, subnet BitOPs and a BitOPs-constrained evolutionary search.

Shen, Liang, Gong, Li, Li, Lin, Yu, Yan, Ouyang, "Once Quantization-Aware Training: High Performance Extremely
Low-bit Architecture Search" (OQAT, ICCV 2021); evaluation code ``LaVieEnRoseSMZ/OQA`` (the training code is
unreleased). docs/methods/oqat.md lists the equations, sources, choices and deviations. In short:

- **Quantized supernet** (:func:`build_oqat_supernet`): :class:`~zsqpipe.nas.supernet201.NB201Supernet` with
  every conv/linear swapped by :func:`~zsqpipe.quant.quantize_model` for an LSQ-quantized one (Esser et al.,
  ICLR 2020, Eq. 1-3; ``lsq_tensor``: one weight step per layer, as OQAT's scalar ``sw``) and an LSQ
  activation quantizer after every ReLU (one ``sa`` per layer, on the conv input of each ReLU-Conv-BN). The
  weights and both steps live in the supernet's layer, so every subnet that runs that layer uses (and trains)
  the *same* step sizes: this is OQAT's shared step size. Stem conv and classifier stay full precision (OQAT).
- **Bit inheritance** (:func:`inherit_bits`): copy weights, BN and steps of the b-bit supernet into a b'-bit one
  and set s_{b'} = 2^(b-b') s_b (rule ``double``; 4 -> 3: s_3 = 2 s_4), or re-initialise every step with LSQ's
  init 2 mean|x| / sqrt(Q_P) (rule ``reinit``).
- **BN recalibration** (:func:`recalibrate_bn`, re-exported from supernet201): reset running statistics,
  forward N training batches in train mode with momentum None (cumulative average), then evaluate.
- **BitOPs** (:func:`subnet_bitops`): sum over the subnet's quantized conv/linear layers that run of
  MACs x w_bits x a_bits (a_bits = 32 where the input is not quantized: the ResNet shortcut conv after avg-pool).
  FP layers (stem, classifier) are reported as MACs separately and as OQAT's FLOPs = FP MACs + BitOPs / 64.
- **Search** (:func:`constrained_search`): evolution (mutation + crossover) over cells with BitOPs <= budget,
  ranked by *validation* accuracy after BN recalibration; the function never sees test data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import from_dict as _from_dict
from zsqpipe.data.loaders import endless
from zsqpipe.engine import Timer
from zsqpipe.errors import ConfigError
from zsqpipe.nas.calr import cosine_factor, sample_arch
from zsqpipe.nas.spaces.nb201 import NUM_EDGES, OPS, Arch, arch_to_str
from zsqpipe.nas.spaces.ofa import OFASpaceConfig
from zsqpipe.nas.supernet201 import NB201Supernet, recalibrate_bn, single_path_epochs
from zsqpipe.nas.supernet_ofa import OFASupernet
from zsqpipe.quant import QuantConfig, count_bitops, quantize_model, set_quant_state
from zsqpipe.quant.config import FP_BITS
from zsqpipe.quant.modules import QuantAct
from zsqpipe.quant.quantizers import LSQQuantizer, create_quantizer
from zsqpipe.resume import Checkpoints, PyRandomState, attach_epoch_loop

__all__ = [
    "INHERIT_RULES",
    "SPACES",
    "NB201Space",
    "OFAMBV3Space",
    "OQATSearchConfig",
    "OQATTrainConfig",
    "build_oqat_supernet",
    "constrained_search",
    "inherit_bits",
    "init_step_sizes",
    "oqat_space",
    "oqat_quant_config",
    "pareto_front",
    "recalibrate_bn",
    "step_sizes",
    "subnet_accuracy",
    "subnet_bitops",
    "train_oqat",
]

INHERIT_RULES = ("double", "reinit")
WEIGHT_QUANTIZERS = ("lsq_tensor", "lsq")
SPACES = ("nb201", "ofa_mbv3")
UNIFORM_CONV_ARCHS: tuple[Arch, ...] = (("nor_conv_1x1",) * NUM_EDGES, ("nor_conv_3x3",) * NUM_EDGES)
LARGEST: Arch = ("nor_conv_3x3",) * NUM_EDGES
Supernet = NB201Supernet | OFASupernet


def _int(prefix: str, key: str, v: Any, minimum: int = 1, null: bool = False) -> None:
    if v is None and null:
        return
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        what = "null or an integer" if null else "an integer"
        raise ConfigError(f"{prefix}.{key}: expected {what} >= {minimum}, got {v!r}")


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class OQATTrainConfig:
    """Training recipe of one OQAT supernet (config ``oqat.train``; the inherited lower-bit supernets use
    ``oqat.train`` updated by ``oqat.finetune``). OQAT's recipe is unreleased: the defaults are our assumptions
    (SPOS-style SGD as supernet.train, cosine LR per iteration, uniform single-path sampling).

    bits: W = A bits of the supernet (uniform over the network, OQAT). space: ``nb201`` (the NB201 cell
    supernet, C = width, N = cells per stage) or ``ofa_mbv3`` (the OFA / MobileNetV3 space of
    :mod:`zsqpipe.nas.spaces.ofa`, sized by ``ofa``: an :class:`OFASpaceConfig` dict, null = its defaults;
    OQAT's own space). weight_quantizer: ``lsq_tensor`` (one weight step per layer, OQAT) or ``lsq`` (per
    output channel; nb201 only: an elastic layer's channel count varies). block_input_quant (ofa_mbv3): the LSQ
    quantizer on each block's input (a linear-bottleneck output or residual sum, signed): ``signed`` (default)
    or ``unsigned``, which clips its negative part to 0 as the official OQA code does (``lsq_conv.py`` quantizes
    every conv input unsigned).
    bn_affine: BN with affine parameters (NB201 supernets: false). epochs x iters: schedule length (iters null
    = one pass over the training split per epoch). lr, momentum, nesterov, wd, grad_clip: SGD; step sizes get no
    weight decay. init_batches: training batches that initialise the LSQ steps (2 mean|x| / sqrt(Q_P), averaged;
    run with subnets that together reach every quantizer: NB201 the all-conv1x1 and all-conv3x3 cells, OFA the
    largest subnet). inherit_rule: how an
    inherited supernet's steps are set (``double``: s_{b'} = 2^(b-b') s_b; ``reinit``: LSQ init again).
    bn_batches, val_images: the after-training sanity check (largest cell's validation top-1 after BN
    recalibration, also measured right after inheritance, before fine-tuning)."""

    bits: int = 4
    space: str = "nb201"
    C: int = 8
    N: int = 1
    ofa: dict | None = None
    block_input_quant: str = "signed"
    weight_quantizer: str = "lsq_tensor"
    bn_affine: bool = False
    epochs: int = 2
    iters: int | None = 200
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    wd: float = 5e-4
    grad_clip: float | None = 5.0
    batch_size: int = 64
    augment: bool = False
    init_batches: int = 2
    inherit_rule: str = "double"
    bn_batches: int = 10
    val_images: int | None = 1000
    eval_batch_size: int = 500
    seed: int = 0

    def __post_init__(self):
        p = "oqat.train"
        if not (isinstance(self.bits, int) and not isinstance(self.bits, bool) and 2 <= self.bits <= 8):
            raise ConfigError(f"{p}.bits: expected an integer in 2..8, got {self.bits!r}")
        for key in ("C", "N", "epochs", "batch_size", "init_batches", "bn_batches", "eval_batch_size"):
            _int(p, key, getattr(self, key))
        for key in ("iters", "val_images"):
            _int(p, key, getattr(self, key), null=True)
        _int(p, "seed", self.seed, minimum=0)
        if self.space not in SPACES:
            raise ConfigError(f"{p}.space: expected one of {list(SPACES)}, got {self.space!r}")
        if self.ofa is not None and not isinstance(self.ofa, dict):
            raise ConfigError(f"{p}.ofa: expected null or a mapping, got {self.ofa!r}")
        if self.space == "ofa_mbv3":
            ofa = OFASpaceConfig.from_dict(self.ofa, f"{p}.ofa")
            object.__setattr__(self, "ofa", ofa.to_dict())  # canonical: every key, lists
            if self.weight_quantizer != "lsq_tensor":
                raise ConfigError(
                    f"{p}.weight_quantizer: the ofa_mbv3 space needs lsq_tensor (elastic channels)"
                )
        elif self.ofa is not None:
            raise ConfigError(f"{p}.ofa: only for space ofa_mbv3 (space is {self.space!r})")
        if self.block_input_quant not in ("signed", "unsigned"):
            raise ConfigError(
                f"{p}.block_input_quant: expected 'signed' or 'unsigned', got {self.block_input_quant!r}"
            )
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ConfigError(
                f"{p}.weight_quantizer: expected one of {list(WEIGHT_QUANTIZERS)}, got {self.weight_quantizer!r}"
            )
        if self.inherit_rule not in INHERIT_RULES:
            raise ConfigError(
                f"{p}.inherit_rule: expected one of {list(INHERIT_RULES)}, got {self.inherit_rule!r}"
            )
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ConfigError(f"{p}.lr: expected a positive number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{p}.momentum: expected a number in [0, 1), got {self.momentum!r}")
        if not self.wd >= 0:
            raise ConfigError(f"{p}.wd: expected a number >= 0, got {self.wd!r}")
        gc = self.grad_clip
        if gc is not None and not (isinstance(gc, int | float) and not isinstance(gc, bool) and gc > 0):
            raise ConfigError(f"{p}.grad_clip: expected null or a positive number, got {gc!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, prefix: str = "oqat.train") -> OQATTrainConfig:
        return _from_dict(cls, d, prefix)


@dataclass(frozen=True)
class OQATSearchConfig:
    """BitOPs-constrained search on one trained supernet (config ``oqat.search``).

    budgets: BitOPs budgets as fractions of the largest cell's (all conv3x3) BitOPs *at the supernet's bits*.
    population, generations, children, parents, mutation_prob: evolution (SPOS/OQAT-style): a random feasible
    population, then per generation ``children`` new feasible cells from the best ``parents`` (half mutation,
    each edge re-drawn with ``mutation_prob``; half uniform crossover). Evaluations are cached across budgets.
    bn_batches x batch_size: training images that recalibrate BN before each cell is scored (OQAT: 2000 images,
    batch 100). val_images: the validation images that score a cell (the search signal); test_images: the
    test images of the *found* cells' report (null = all), read only after the search."""

    budgets: list[float] = field(default_factory=lambda: [0.35, 0.6, 1.0])
    population: int = 12
    generations: int = 3
    children: int = 8
    parents: int = 4
    mutation_prob: float = 0.3
    bn_batches: int = 10
    batch_size: int = 64
    val_images: int | None = 1000
    test_images: int | None = None
    eval_batch_size: int = 500
    seed: int = 0

    def __post_init__(self):
        p = "oqat.search"
        if not (isinstance(self.budgets, list | tuple) and self.budgets):
            raise ConfigError(f"{p}.budgets: expected a non-empty list of fractions, got {self.budgets!r}")
        for i, b in enumerate(self.budgets):
            if not (isinstance(b, int | float) and not isinstance(b, bool) and 0 < b <= 1):
                raise ConfigError(f"{p}.budgets.{i}: expected a fraction in (0, 1], got {b!r}")
        for key in ("population", "children", "parents", "bn_batches", "batch_size", "eval_batch_size"):
            _int(p, key, getattr(self, key))
        _int(p, "generations", self.generations, minimum=0)
        _int(p, "seed", self.seed, minimum=0)
        for key in ("val_images", "test_images"):
            _int(p, key, getattr(self, key), null=True)
        if not (isinstance(self.mutation_prob, int | float) and 0 < self.mutation_prob <= 1):
            raise ConfigError(f"{p}.mutation_prob: expected a number in (0, 1], got {self.mutation_prob!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, prefix: str = "oqat.search") -> OQATSearchConfig:
        d = dict(d or {})
        if isinstance(d.get("budgets"), tuple):
            d["budgets"] = list(d["budgets"])
        return _from_dict(cls, d, prefix)


# ----------------------------------------------------------------------------------------------------------
# Quantized supernet


HEAD_ACT = {"nb201": "lastact.1", "ofa_mbv3": "final_expand.2"}  # the ReLU that only feeds the FP classifier


def oqat_quant_config(bits: int, weight_quantizer: str = "lsq_tensor", space: str = "nb201") -> QuantConfig:
    """W = A = ``bits`` LSQ everywhere except the stem conv, the classifier and the head's ReLU (which only
    feeds the FP classifier): OQAT leaves the first conv and the classifier in full precision."""
    return QuantConfig(
        weight_bits=bits,
        act_bits=bits,
        first_layer_bits=FP_BITS,
        last_layer_bits=FP_BITS,
        layer_bits={HEAD_ACT[space]: FP_BITS},
        weight_quantizer=weight_quantizer,
        act_quantizer="lsq",
    )


class NB201Space:
    """The NB201 cell space as OQAT sees it: archs are op tuples (hashable), strings the NB201 format."""

    name = "nb201"
    largest: Arch = LARGEST
    cover: tuple[Arch, ...] = UNIFORM_CONV_ARCHS  # together they run every quantized layer

    def sample(self, rng: random.Random) -> Arch:
        return sample_arch(rng)

    def mutate(self, arch: Arch, rng: random.Random, p: float) -> Arch:
        """Re-draw each edge with probability ``p`` (at least one) to a different op."""
        ops = list(arch)
        edges = [e for e in range(NUM_EDGES) if rng.random() < p] or [rng.randrange(NUM_EDGES)]
        for e in edges:
            ops[e] = rng.choice([o for o in OPS if o != ops[e]])
        return tuple(ops)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))

    def to_str(self, arch: Arch) -> str:
        return arch_to_str(arch)

    def describe(self, arch: Arch) -> dict[str, Any]:
        return {"ops": list(arch)}


class OFAMBV3Space:
    """The OFA / MobileNetV3 space as OQAT sees it: archs are canonical strings (:meth:`OFASpaceConfig.to_str`,
    hashable, one per distinct subnet); mutation and crossover act on OFA's dict (OFA's evolution finder)."""

    name = "ofa_mbv3"

    def __init__(self, cfg: OFASpaceConfig):
        self.cfg = cfg
        self.largest = cfg.to_str(cfg.largest)
        self.cover = (self.largest,)  # the largest subnet runs every elastic layer at full size

    def sample(self, rng: random.Random) -> str:
        return self.cfg.to_str(self.cfg.sample(rng))

    def mutate(self, arch: str, rng: random.Random, p: float) -> str:
        return self.cfg.to_str(self.cfg.mutate(self.cfg.from_str(arch), rng, p))

    def crossover(self, a: str, b: str, rng: random.Random) -> str:
        return self.cfg.to_str(self.cfg.crossover(self.cfg.from_str(a), self.cfg.from_str(b), rng))

    def to_str(self, arch: str) -> str:
        return arch

    def describe(self, arch: str) -> dict[str, Any]:
        return {"ofa": self.cfg.from_str(arch)}


def oqat_space(cfg_or_model: OQATTrainConfig | nn.Module) -> NB201Space | OFAMBV3Space:
    """The search-space adapter of a train config or of a supernet."""
    x = cfg_or_model
    if isinstance(x, OFASupernet):
        return OFAMBV3Space(x.space)
    if isinstance(x, OQATTrainConfig) and x.space == "ofa_mbv3":
        return OFAMBV3Space(OFASpaceConfig.from_dict(x.ofa))
    return NB201Space()


def build_oqat_supernet(
    cfg: OQATTrainConfig, in_channels: int, num_classes: int, bits: int | None = None
) -> Supernet:
    """The supernet of ``cfg`` (NB201 or OFA space; BN with running statistics, recalibrated per subnet)
    quantized at ``bits`` (default ``cfg.bits``). Step sizes are uninitialised until :func:`init_step_sizes`
    (or the first forward of a layer, LSQ's first-batch init) sets them."""
    if cfg.space == "ofa_mbv3":
        model: Supernet = OFASupernet(OFASpaceConfig.from_dict(cfg.ofa), in_channels, num_classes)
    else:
        model = NB201Supernet(
            C=cfg.C,
            N=cfg.N,
            in_channels=in_channels,
            num_classes=num_classes,
            affine=cfg.bn_affine,
            track_running_stats=True,
        )
    bits = cfg.bits if bits is None else bits
    quantize_model(model, oqat_quant_config(bits, cfg.weight_quantizer, cfg.space))
    if isinstance(model, OFASupernet):  # LSQ on the block inputs (linear-bottleneck outputs, signed)
        signed = cfg.block_input_quant == "signed"
        model.attach_input_quantizers(lambda: QuantAct(create_quantizer("lsq", "act", bits, signed=signed)))
    model.oqat_bits = bits
    return model


def _restore(model: Supernet, arch) -> None:
    if arch is None:
        model.arch = None
    else:
        model.set_active_subnet(arch)


def lsq_quantizers(model: nn.Module) -> list[tuple[str, LSQQuantizer]]:
    """The active (bits < 32) LSQ quantizers of ``model`` with their module names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LSQQuantizer) and m.bits < FP_BITS]


def step_sizes(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{quantizer name: step size}`` (detached copies) of every active LSQ quantizer."""
    return {n: q.scale.detach().clone() for n, q in lsq_quantizers(model)}


def _reset_steps(model: nn.Module) -> None:
    for _, q in lsq_quantizers(model):
        q._n = 0
        q.num_updates.zero_()


@torch.no_grad()
def init_step_sizes(model: Supernet, batches: Sequence[torch.Tensor], reset: bool = True) -> None:
    """LSQ step-size init (Esser et al. 2020; OQAT ``lsq_conv.py``): s = 2 mean|x| / sqrt(Q_P) for every weight
    and activation quantizer, averaged over ``batches`` (inputs) run through subnets that together reach every
    quantized layer of the supernet (NB201: the all-conv1x1 and all-conv3x3 cells; OFA: the largest subnet,
    so an elastic layer's weight step is initialised on its full weight). BN running statistics are left as
    they were (they are recalibrated before any evaluation)."""
    if reset:
        _reset_steps(model)
    arch, was_training = model.arch, model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    set_quant_state(model, update_ranges=True)
    model.train()
    try:
        for a in oqat_space(model).cover:
            model.set_active_subnet(a)
            for x in batches:
                model(x)
    finally:
        set_quant_state(model, update_ranges=False)
        for m, s in zip(bns, saved, strict=True):
            m.load_state_dict(s)
        _restore(model, arch)
        model.train(was_training)


def inherit_bits(
    parent: Supernet,
    cfg: OQATTrainConfig,
    bits: int,
    rule: str = "double",
    init_batches: Sequence[torch.Tensor] | None = None,
) -> Supernet:
    """OQAT bit inheritance: a ``bits``-bit supernet initialised from the trained ``parent`` (higher bits):
    every weight, BN parameter/statistic and step size is copied, then each active step is set by ``rule``:

    - ``double``: s_{b'} = 2^(b - b') s_b, i.e. s_{b-1} = 2 s_b per bit (the reference note's rule, from a
      secondary summary of the paper: the clipping range Q_P s is roughly kept, 7 s_4 ~ 3 (2 s_4) for weights
      and 15 s_4 ~ 7 (2 s_4) for activations);
    - ``reinit``: LSQ's init 2 mean|x| / sqrt(Q_P) at the new bits (:func:`init_step_sizes` on
      ``init_batches``, required).
    """
    if rule not in INHERIT_RULES:
        raise ConfigError(f"oqat.train.inherit_rule: expected one of {list(INHERIT_RULES)}, got {rule!r}")
    parent_bits = int(getattr(parent, "oqat_bits", 0))
    if not 2 <= bits < parent_bits:
        raise ConfigError(f"oqat: bit inheritance goes to fewer bits (>= 2): {parent_bits} -> {bits}")
    if isinstance(parent, OFASupernet):
        same = (("space", "ofa_mbv3"), ("ofa", parent.space.to_dict()))
    else:
        same = (("space", "nb201"), ("C", parent.C), ("N", parent.N))
    for key, have in same:
        if getattr(cfg, key) != have:
            raise ConfigError(
                f"oqat.train.{key}: the config says {getattr(cfg, key)!r}, the parent has {have!r}"
            )
    child = build_oqat_supernet(cfg, parent.in_channels, parent.num_classes, bits)
    device = next(parent.parameters()).device
    child.to(device).load_state_dict(parent.state_dict())
    if rule == "double":
        factor = 2.0 ** (parent_bits - bits)
        for _, q in lsq_quantizers(child):
            q.scale.data.mul_(factor)
    else:
        if not init_batches:
            raise ConfigError("oqat: inherit_rule 'reinit' needs training batches to re-initialise the steps")
        init_step_sizes(child, init_batches)
    child.inherited = {"from_bits": parent_bits, "rule": rule}
    return child


# ----------------------------------------------------------------------------------------------------------
# BitOPs, evaluation


def subnet_bitops(model: Supernet, arch: Arch | str | int, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Cost of subnet ``arch`` for one input of ``input_shape`` (C, H, W), counted over the layers its
    forward runs (:func:`zsqpipe.quant.count_bitops`): ``bitops`` = sum over quantized conv/linear layers of
    MACs x w_bits x a_bits (a_bits = 32 for an unquantized input: the ResNet shortcut conv after avg-pool);
    ``fp_macs`` = MACs of the full-precision layers (stem conv, classifier), not in ``bitops``; ``macs`` = all
    MACs; ``oqat_mflops`` = (fp_macs + bitops / 64) / 1e6, OQAT's ``profile_quant`` cost."""
    saved = model.arch
    model.set_active_subnet(arch)
    try:
        records = count_bitops(model, tuple(input_shape))
    finally:
        _restore(model, saved)
    quantized = [r for r in records if r.weight_bits < FP_BITS]
    bitops = sum(r.bitops for r in quantized)
    fp_macs = sum(r.macs for r in records if r.weight_bits >= FP_BITS)
    return {
        "bitops": int(bitops),
        "fp_macs": int(fp_macs),
        "macs": int(sum(r.macs for r in records)),
        "oqat_mflops": (fp_macs + bitops / 64) / 1e6,
        "quantized_layers": len(quantized),
    }


@torch.no_grad()
def subnet_accuracy(
    model: Supernet,
    arch: Arch | str | int,
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    eval_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Top-1 (%) of subnet ``arch`` on ``eval_batches`` after BN recalibration on ``bn_batches`` (OQAT: the
    subnet is deployed without retraining, only its BN statistics are re-estimated)."""
    was_training = model.training
    model.set_active_subnet(arch)
    recalibrate_bn(model, bn_batches, len(bn_batches))
    model.eval()
    hits, n = 0, 0
    for x, y in eval_batches:
        hits += int((model(x).argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return 100.0 * hits / max(n, 1)


# ----------------------------------------------------------------------------------------------------------
# Training


def train_oqat(
    model: Supernet,
    loader: Iterable,
    cfg: OQATTrainConfig,
    device=None,
    log: Callable[[str], None] | None = print,
    on_epoch: Callable[[int, dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[dict]:
    """Quantization-aware supernet training at the model's bits (OQAT step 1, or the fine-tuning after bit
    inheritance). Per iteration t of T = epochs x iters (SPOS uniform single-path sampling; OQAT samples OFA
    subnets, its exact rule is unreleased):

        alpha ~ U(space) (NB201: 15,625 cells; OFA: each ks, e, d uniform);  lr = lr0 (1 + cos(pi t/T)) / 2
        zero_grad; CE(subnet_alpha(x), y); backward (LSQ gradients, scaled by 1/sqrt(N Q_P)); clip; SGD step

    Weights and the shared step sizes are updated together; only the parameters the subnet used get a
    gradient (zero_grad to None). Subnets come from ``random.Random(cfg.seed)``; the caller seeds torch and
    the loader. ``checkpoints``: resume from / save epoch checkpoints (model, optimizer, subnet sampler, data
    stream position; restored epochs are passed to ``on_epoch`` again). Returns one record per epoch."""
    device = device if device is not None else next(model.parameters()).device
    model.to(device).train()
    iters = cfg.iters if cfg.iters is not None else len(loader)  # type: ignore[arg-type]
    total = cfg.epochs * iters
    steps = [p for _, q in lsq_quantizers(model) for p in q.parameters()]
    step_ids = {id(p) for p in steps}
    weights = [p for p in model.parameters() if id(p) not in step_ids and p.requires_grad]
    groups = [{"params": weights, "weight_decay": cfg.wd}]
    if steps:
        groups.append({"params": steps, "weight_decay": 0.0})
    opt = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )
    rng = random.Random(cfg.seed)
    space = oqat_space(model)
    data = endless(loader)  # the batches of cycle_batches(loader), with a position that can be saved
    if log is not None:
        log(
            f"oqat: w{model.oqat_bits}a{model.oqat_bits} supernet, T={total} ({cfg.epochs} epochs x {iters} iters)"
        )
    history: list[dict] = []
    timer = Timer()
    first = attach_epoch_loop(checkpoints, history, timer, on_epoch, model=model, optimizer=opt,
                              sampler=PyRandomState(rng), data=data)  # fmt: skip

    def step(t: int, x: torch.Tensor, y: torch.Tensor):
        lr = cfg.lr * cosine_factor(t, total)
        for g in opt.param_groups:
            g["lr"] = lr
        model.set_active_subnet(space.sample(rng))
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss, logits, lr

    return single_path_epochs(step, data, device, cfg.epochs, iters, first, history, timer,
                              f"oqat w{model.oqat_bits}", log, on_epoch, checkpoints)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Search


def constrained_search(
    evaluate: Callable[[Arch], float],
    cost: Callable[[Arch], float],
    budget: float,
    cfg: OQATSearchConfig,
    seed: int = 0,
    cache: dict[Arch, float] | None = None,
    max_tries: int = 500,
    space: NB201Space | OFAMBV3Space | None = None,
) -> dict[str, Any]:
    """Evolutionary search for the cell with the best ``evaluate`` score (validation top-1) among cells with
    ``cost`` (BitOPs) <= ``budget`` (SPOS / OQAT: evolution under a FLOPs constraint; OQAT's ``profile_quant``
    cost is BitOPs-based). Population of ``cfg.population`` random feasible cells, then ``cfg.generations``
    rounds of ``cfg.children`` new feasible cells (half mutation, half crossover of the best ``cfg.parents``).
    ``evaluate`` results are memoised in ``cache``; cells already in it that fit the budget join the candidates
    for free, so with a shared cache and increasing budgets the found accuracy never drops as the budget
    grows. Ties are broken by lower cost.
    Returns ``{arch, val_acc, cost, evaluated: [arch, ...]}``; ``arch`` is None when no feasible cell is found."""
    rng = random.Random(seed)
    space = space or NB201Space()
    cache = {} if cache is None else cache
    seen: list[Arch] = []

    def score(a: Arch) -> float:
        if a not in cache:
            cache[a] = float(evaluate(a))
        return cache[a]

    def add(a: Arch) -> bool:
        if a in seen or cost(a) > budget:
            return False
        seen.append(a)
        score(a)
        return True

    for a in list(cache):  # cells already scored (smaller budgets) are free candidates
        if cost(a) <= budget:
            seen.append(a)
    tries, new = 0, 0
    while new < cfg.population and tries < max_tries:
        tries += 1
        new += add(space.sample(rng))
    for _ in range(cfg.generations):
        if not seen:
            break
        parents = sorted(seen, key=lambda a: (-cache[a], cost(a)))[: cfg.parents]
        made, tries = 0, 0
        while made < cfg.children and tries < max_tries:
            tries += 1
            if made % 2 == 0 or len(parents) < 2:
                child = space.mutate(rng.choice(parents), rng, cfg.mutation_prob)
            else:
                a, b = rng.sample(parents, 2)
                child = space.crossover(a, b, rng)
            made += add(child)
    if not seen:
        return {"arch": None, "val_acc": None, "cost": None, "evaluated": []}
    best = min(seen, key=lambda a: (-cache[a], cost(a), seen.index(a)))
    return {"arch": best, "val_acc": cache[best], "cost": cost(best), "evaluated": list(seen)}


def pareto_front(points: Iterable[tuple[Any, float, float]]) -> list[tuple[Any, float, float]]:
    """Non-dominated ``(key, cost, score)`` points (lower cost, higher score), sorted by cost."""
    best: list[tuple[Any, float, float]] = []
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if not best or p[2] > best[-1][2]:
            best.append(p)
    return best
