"""OQAT configs: the training recipe (:class:`OQATTrainConfig`) and the search (:class:`OQATSearchConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from zsqpipe.config import (
    ConfigBase,
    Doc,
    Momentum,
    Nested,
    NonNegFloat,
    NonNegInt,
    OneOf,
    PosFloat,
    PosInt,
    Range,
    Schema,
)
from zsqpipe.errors import ConfigError
from zsqpipe.nas.spaces.nb201 import NUM_EDGES, Arch
from zsqpipe.nas.spaces.ofa import OFASpaceConfig
from zsqpipe.nas.supernet201 import NB201Supernet
from zsqpipe.nas.supernet_ofa import OFASupernet

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
class OQATTrainConfig(ConfigBase):
    """Training recipe of one OQAT supernet (config ``oqat.train``; the inherited lower-bit supernets use
    ``oqat.train`` updated by ``oqat.finetune``). OQAT's recipe is unreleased: the defaults are our assumptions
    (SPOS-style SGD as supernet.train, cosine LR per iteration, uniform single-path sampling).

    bits: W = A bits of the supernet (uniform over the network, OQAT). space: ``nb201`` (the NB201 cell
    supernet, C = width, N = cells per stage) or ``ofa_mbv3`` (the OFA / MobileNetV3 space of
    :mod:`zsqpipe.nas.spaces.ofa`, sized by ``ofa``: an :class:`OFASpaceConfig` dict, null = its defaults;
    OQAT's own space). weight_quantizer: ``lsq_tensor`` (one weight step per layer, OQAT) or ``lsq`` (per
    output channel; nb201 only: an elastic layer's channel count varies). block_input_quant (ofa_mbv3): the LSQ
    quantizers on the activations that can be negative (each block's input, a linear-bottleneck output or
    residual sum; every h-swish output; the SE output of h-swish blocks): ``signed`` (default) or ``unsigned``,
    which clips their negative part to 0 as the official OQA code does (``lsq_conv.py`` quantizes every conv
    input unsigned).
    bn_affine: BN with affine parameters (NB201 supernets: false). epochs x iters: schedule length (iters null
    = one pass over the training split per epoch). lr, momentum, nesterov, wd, grad_clip: SGD; step sizes get no
    weight decay. init_batches: training batches that initialise the LSQ steps (2 mean|x| / sqrt(Q_P), averaged;
    run with subnets that together reach every quantizer: NB201 the all-conv1x1 and all-conv3x3 cells, OFA the
    largest subnet). inherit_rule: how an
    inherited supernet's steps are set (``double``: s_{b'} = 2^(b-b') s_b; ``reinit``: LSQ init again).
    bn_batches, val_images: the after-training sanity check (largest cell's validation top-1 after BN
    recalibration, also measured right after inheritance, before fine-tuning)."""

    prefix = "oqat.train"  # how its errors name keys (ConfigBase.from_dict renames)

    bits: int = 4
    space: Annotated[
        str, OneOf(*SPACES), Doc("nb201 = the NB201 cell supernet (C, N); ofa_mbv3 = the OFA / MobileNetV3 space (ofa; docs/methods/ofa_space.md)")
    ] = "nb201"
    C: Annotated[PosInt, Doc("nb201: channels of the first stage (then 2C, 4C)")] = 8
    N: Annotated[PosInt, Doc("nb201: cells per stage")] = 1
    ofa: Annotated[
        dict | None, Nested("zsqpipe.nas.spaces.ofa:OFASpaceConfig"), Doc("ofa_mbv3: OFASpaceConfig (zsqpipe/nas/spaces/ofa.py); null = its CPU defaults")
    ] = None
    block_input_quant: Annotated[
        str, OneOf("signed", "unsigned"), Doc("ofa_mbv3: LSQ on the signed activations (block inputs, h-swish and its SE outputs); unsigned = the official OQA code (clips negatives to 0)")
    ] = "signed"
    weight_quantizer: Annotated[
        str, OneOf("lsq_tensor", "lsq"), Doc("lsq_tensor = one weight step per layer (OQAT); lsq = per output channel (nb201 only)")
    ] = "lsq_tensor"
    bn_affine: bool = False
    epochs: PosInt = 2
    iters: Annotated[
        PosInt | None, Doc("iterations per epoch; null = one pass over the training split")
    ] = 200
    lr: PosFloat = 0.05
    momentum: Momentum = 0.9
    nesterov: bool = True
    wd: Annotated[NonNegFloat, Doc("weight decay of the weights (step sizes get none)")] = 5e-4
    grad_clip: PosFloat | None = 5.0
    batch_size: PosInt = 64
    augment: bool = False
    init_batches: Annotated[PosInt, Doc("training batches of the LSQ step-size init")] = 2
    inherit_rule: Annotated[
        str, OneOf(*INHERIT_RULES), Doc("inherited steps: double = s_{b-1} = 2 s_b; reinit = LSQ init 2 mean|x|/sqrt(Q_P) again")
    ] = "double"
    bn_batches: Annotated[PosInt, Doc("BN recalibration batches of the largest-cell sanity check")] = 10
    val_images: PosInt | None = 1000
    eval_batch_size: PosInt = 500
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


@dataclass(frozen=True)
class OQATSearchConfig(ConfigBase):
    """BitOPs-constrained search on one trained supernet (config ``oqat.search``).

    budgets: BitOPs budgets as fractions of the largest cell's (all conv3x3) BitOPs *at the supernet's bits*.
    population, generations, children, parents, mutation_prob: evolution (SPOS/OQAT-style): a random feasible
    population, then per generation ``children`` new feasible cells from the best ``parents`` (half mutation,
    each edge re-drawn with ``mutation_prob``; half uniform crossover). Evaluations are cached across budgets.
    bn_batches x batch_size: training images that recalibrate BN before each cell is scored (OQAT: 2000 images,
    batch 100). val_images: the validation images that score a cell (the search signal); test_images: the
    test images of the *found* cells' report (null = all), read only after the search."""

    prefix = "oqat.search"  # how its errors name keys (ConfigBase.from_dict renames)

    budgets: Annotated[
        list[float], Schema(minItems=1, items={'type': 'number', 'exclusiveMinimum': 0, 'maximum': 1}), Doc("BitOPs budgets as fractions of the largest cell's BitOPs at the supernet's bits")
    ] = field(default_factory=lambda: [0.35, 0.6, 1.0])
    population: PosInt = 12
    generations: NonNegInt = 3
    children: PosInt = 8
    parents: PosInt = 4
    mutation_prob: Annotated[float, Range(gt=0, le=1)] = 0.3
    bn_batches: Annotated[PosInt, Doc("BN recalibration batches per cell (OQAT: 20 x 100 images)")] = 10
    batch_size: PosInt = 64
    val_images: Annotated[
        PosInt | None, Doc("validation images that score a cell (the search signal)")
    ] = 1000
    test_images: Annotated[PosInt | None, Doc("test images of the found cells' report; null = all")] = None
    eval_batch_size: PosInt = 500
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
