"""The OFA / MobileNetV3 search space (Cai, Gan, Wang, Zhang, Han, "Once-for-All", ICLR 2020; MobileNetV3,
Howard et al., ICCV 2019), scaled by config so it runs on 28x28 Fashion-MNIST on a CPU.

The network is a stem conv, one fixed MBConv (k3, expand 1), ``len(widths)`` *units* of up to
``max(depth_list)`` MBConv blocks, a final 1x1 expansion and the classifier. Each unit's first block changes
width and stride; the others keep both and have a residual. Three elastic dimensions (OFA's): per block the
depthwise kernel size ``ks`` in ``ks_list`` and the expand ratio ``e`` in ``expand_list``, per unit the depth
``d`` in ``depth_list`` (the first ``d`` blocks run).

An architecture is OFA's plain dict ``{"ks": [...], "e": [...], "d": [...]}`` with ``ks``/``e`` listed for all
``units x max_depth`` blocks (entries of blocks a shallower unit skips are ignored) and ``d`` per unit. Its
canonical string keeps only the blocks that run, unit by unit: ``k3e4-k5e6|k7e3-k3e3-k5e4|...`` (so two dicts
that differ only in skipped blocks have the same string: it is the key to cache a subnet's score by).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Annotated, Any

from zsqpipe.config import ConfigBase, Doc, OneOf, PosInt, Range, Schema
from zsqpipe.errors import ConfigError

OFAArch = dict[str, list[int]]

# OFA MobileNetV3 (ofa_mbv3_d234_e346_k357_w1.0): unit widths and strides; stem 16, first block 16,
# final expansion 960 (6 x 160), feature mix 1280
MBV3_WIDTHS = (24, 40, 80, 112, 160)
MBV3_STRIDES = (2, 2, 2, 1, 2)
# its activations and squeeze-and-excitation per unit (OFA's act_stages / se_stages after the first block);
# the stem and the final expansion use h-swish, the first block ReLU
ACTIVATIONS = ("relu", "h_swish")
MBV3_ACTIVATIONS = ("relu", "relu", "h_swish", "h_swish", "h_swish")
MBV3_SE = (False, True, False, True, True)


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of ``divisor``, at least ``divisor``, never below 90 % of
    ``v`` (the torchvision / OFA ``make_divisible``)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _ints(prefix: str, key: str, v: Any, allowed=None, minimum: int = 1) -> tuple[int, ...]:
    if not (
        isinstance(v, list | tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ):
        raise ConfigError(f"{prefix}.{key}: expected a non-empty list of integers, got {v!r}")
    for i, x in enumerate(v):
        if x < minimum or (allowed is not None and x not in allowed):
            want = f"one of {sorted(allowed)}" if allowed is not None else f">= {minimum}"
            raise ConfigError(f"{prefix}.{key}.{i}: expected {want}, got {x!r}")
    return tuple(v)


@dataclass(frozen=True)
class OFASpaceConfig(ConfigBase):
    """The space and the size of its supernet (config ``oqat.train.ofa``, or any stage using this space).

    ks_list, expand_list, depth_list: the elastic choices (OFA: {3,5,7}, {3,4,6}, {2,3,4}). widths, strides:
    output channels and stride of each unit's first block before ``width_mult`` (MobileNetV3: 24, 40, 80,
    112, 160 with strides 2, 2, 2, 1, 2 on 224x224). stem_width, stem_stride: the stem conv (MBV3: 16, 2).
    width_mult: scales every width (``make_divisible`` by 8). final_expand: the 1x1 conv before pooling has
    ``final_expand x`` the last width (MBV3: 6). kernel_transform: OFA's kernel transformation (a smaller kernel
    is the centre of the larger one times a learned (k^2 x k^2) matrix per layer and size, initialised to the
    identity); false = plain centre crop. activations, se: per unit, the blocks' activation (``relu`` or
    ``h_swish``) and whether they squeeze-and-excite (MobileNetV3: ReLU in units 1-2, h-swish after; SE in
    units 2, 4, 5); stem_activation, final_activation: the stem's and the final expansion's (MBV3: h-swish).
    The CPU default: width 0.5, stem stride 1 and strides 2, 2, 2, 1, 1 (28x28 -> 4x4), OFA's elastic choices
    and MobileNetV3's activations and SE (docs/methods/ofa_space.md: the quantizers after h-swish are signed)."""

    prefix = "ofa"  # how its errors name keys (ConfigBase.from_dict renames)

    ks_list: Annotated[
        tuple[int, ...], Schema(minItems=1, items={'type': 'integer', 'minimum': 1}), Doc("depthwise kernel sizes (odd; OFA 3, 5, 7)")
    ] = (3, 5, 7)
    expand_list: Annotated[
        tuple[int, ...], Schema(minItems=1, items={'type': 'integer', 'minimum': 1}), Doc("expand ratios (OFA 3, 4, 6)")
    ] = (3, 4, 6)
    depth_list: Annotated[
        tuple[int, ...], Schema(minItems=1, items={'type': 'integer', 'minimum': 1}), Doc("blocks per unit (OFA 2, 3, 4)")
    ] = (2, 3, 4)
    widths: Annotated[
        tuple[int, ...], Schema(minItems=1, items={'type': 'integer', 'minimum': 1}), Doc("unit widths before width_mult (MBV3 24, 40, 80, 112, 160)")
    ] = MBV3_WIDTHS
    strides: Annotated[
        tuple[int, ...], Schema(minItems=1, items={'enum': [1, 2]}), Doc("stride of each unit's first block (CPU default 2, 2, 2, 1, 1)")
    ] = (2, 2, 2, 1, 1)
    stem_width: PosInt = 16
    stem_stride: Annotated[int, OneOf(1, 2)] = 1
    width_mult: Annotated[float, Range(gt=0, le=4)] = 0.5
    final_expand: PosInt = 6
    kernel_transform: Annotated[
        bool, Doc("OFA's learned kernel transformation matrices (false = centre crop)")
    ] = True
    activations: Annotated[
        tuple[str, ...],
        Schema(minItems=1, items={"enum": list(ACTIVATIONS)}),
        Doc("activation of each unit's blocks (MBV3: relu, relu, h_swish, h_swish, h_swish)"),
    ] = MBV3_ACTIVATIONS
    se: Annotated[
        tuple[bool, ...],
        Schema(minItems=1, items={"type": "boolean"}),
        Doc("squeeze-and-excitation in each unit's blocks (MBV3: false, true, false, true, true)"),
    ] = MBV3_SE
    stem_activation: Annotated[str, OneOf(*ACTIVATIONS), Doc("the stem's activation (MBV3: h_swish)")] = "h_swish"
    final_activation: Annotated[
        str, OneOf(*ACTIVATIONS), Doc("the final 1x1 expansion's activation (MBV3: h_swish)")
    ] = "h_swish"

    def __post_init__(self):
        p = "ofa"
        object.__setattr__(self, "ks_list", tuple(sorted(_ints(p, "ks_list", self.ks_list))))
        for i, k in enumerate(self.ks_list):
            if k % 2 == 0:
                raise ConfigError(f"{p}.ks_list.{i}: expected an odd kernel size, got {k}")
        object.__setattr__(self, "expand_list", tuple(sorted(_ints(p, "expand_list", self.expand_list))))
        object.__setattr__(self, "depth_list", tuple(sorted(_ints(p, "depth_list", self.depth_list))))
        widths = _ints(p, "widths", self.widths)
        strides = _ints(p, "strides", self.strides, allowed={1, 2})
        if len(widths) != len(strides):
            raise ConfigError(
                f"{p}.strides: expected {len(widths)} strides (one per unit of widths), got {len(strides)}"
            )
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "strides", strides)
        for key, allowed in (("activations", ACTIVATIONS), ("se", (False, True))):
            v = getattr(self, key)
            if not (isinstance(v, list | tuple) and len(v) == len(widths)):
                raise ConfigError(f"{p}.{key}: expected {len(widths)} entries (one per unit of widths), got {v!r}")
            for i, x in enumerate(v):
                if x not in allowed or type(x) is not type(allowed[0]):
                    raise ConfigError(f"{p}.{key}.{i}: expected one of {list(allowed)}, got {x!r}")
            object.__setattr__(self, key, tuple(v))
        for key in ("stem_activation", "final_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ConfigError(f"{p}.{key}: expected one of {list(ACTIVATIONS)}, got {getattr(self, key)!r}")
        for key in ("stem_width", "final_expand"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected an integer >= 1, got {v!r}")
        if self.stem_stride not in (1, 2):
            raise ConfigError(f"{p}.stem_stride: expected 1 or 2, got {self.stem_stride!r}")
        wm = self.width_mult
        if not (isinstance(wm, int | float) and not isinstance(wm, bool) and 0 < wm <= 4):
            raise ConfigError(f"{p}.width_mult: expected a number in (0, 4], got {wm!r}")

    # ---- derived sizes ----
    @property
    def num_units(self) -> int:
        return len(self.widths)

    @property
    def max_depth(self) -> int:
        return max(self.depth_list)

    @property
    def num_blocks(self) -> int:
        return self.num_units * self.max_depth

    def channels(self, width: int) -> int:
        return make_divisible(width * self.width_mult)

    @property
    def num_archs(self) -> int:
        """Distinct subnets (canonical strings): per unit sum_d (|ks| |e|)^d, multiplied over units."""
        per_block = len(self.ks_list) * len(self.expand_list)
        return math.prod(sum(per_block**d for d in self.depth_list) for _ in range(self.num_units))

    # ---- architectures ----
    def validate(self, arch: OFAArch) -> OFAArch:
        """A copy of ``arch`` with plain-int lists; a wrong key, length or choice raises ``ConfigError``."""
        if not isinstance(arch, dict) or set(arch) != {"ks", "e", "d"}:
            got = sorted(arch) if isinstance(arch, dict) else type(arch).__name__
            raise ConfigError(f"OFA architecture: expected a dict with keys ['d', 'e', 'ks'], got {got}")
        out = {}
        for key, n, allowed in (("ks", self.num_blocks, self.ks_list), ("e", self.num_blocks, self.expand_list),
                                ("d", self.num_units, self.depth_list)):  # fmt: skip
            v = arch[key]
            if not (isinstance(v, list | tuple) and len(v) == n):
                raise ConfigError(f"OFA architecture.{key}: expected a list of {n} values, got {v!r}")
            for i, x in enumerate(v):
                if int(x) != x or int(x) not in allowed:
                    raise ConfigError(
                        f"OFA architecture.{key}.{i}: expected one of {list(allowed)}, got {x!r}"
                    )
            out[key] = [int(x) for x in v]
        return out

    def active_blocks(self, arch: OFAArch) -> list[list[int]]:
        """Block indices (into ``ks``/``e``) that run, per unit."""
        return [list(range(u * self.max_depth, u * self.max_depth + d)) for u, d in enumerate(arch["d"])]

    def to_str(self, arch: OFAArch) -> str:
        arch = self.validate(arch)
        return "|".join(
            "-".join(f"k{arch['ks'][b]}e{arch['e'][b]}" for b in unit) for unit in self.active_blocks(arch)
        )

    def from_str(self, s: str) -> OFAArch:
        """Inverse of :meth:`to_str`; skipped blocks get the smallest choices. A malformed string raises
        ``ConfigError`` naming it."""
        want = "k<ks>e<expand> blocks joined by '-', units joined by '|'"
        units = str(s).strip().split("|")
        if len(units) != self.num_units:
            raise ConfigError(f"OFA architecture string {s!r}: expected {self.num_units} units ({want})")
        ks = [self.ks_list[0]] * self.num_blocks
        e = [self.expand_list[0]] * self.num_blocks
        d = []
        for u, unit in enumerate(units):
            blocks = unit.split("-")
            d.append(len(blocks))
            if len(blocks) > self.max_depth:
                raise ConfigError(
                    f"OFA architecture string {s!r}: unit {u} has {len(blocks)} blocks, max {self.max_depth}"
                )
            for j, blk in enumerate(blocks):
                try:
                    k_txt, e_txt = blk.removeprefix("k").split("e")
                    ks[u * self.max_depth + j], e[u * self.max_depth + j] = int(k_txt), int(e_txt)
                except ValueError:
                    raise ConfigError(f"OFA architecture string {s!r}: block {blk!r} ({want})") from None
        return self.validate({"ks": ks, "e": e, "d": d})

    def uniform(self, ks: int, e: int, d: int) -> OFAArch:
        return self.validate(
            {"ks": [ks] * self.num_blocks, "e": [e] * self.num_blocks, "d": [d] * self.num_units}
        )

    @property
    def largest(self) -> OFAArch:
        return self.uniform(self.ks_list[-1], self.expand_list[-1], self.depth_list[-1])

    @property
    def smallest(self) -> OFAArch:
        return self.uniform(self.ks_list[0], self.expand_list[0], self.depth_list[0])

    def sample(self, rng: random.Random) -> OFAArch:
        """OFA's ``sample_active_subnet``: every block's ks and e and every unit's d uniformly at random."""
        return {
            "ks": [rng.choice(self.ks_list) for _ in range(self.num_blocks)],
            "e": [rng.choice(self.expand_list) for _ in range(self.num_blocks)],
            "d": [rng.choice(self.depth_list) for _ in range(self.num_units)],
        }

    def mutate(self, arch: OFAArch, rng: random.Random, p: float) -> OFAArch:
        """Re-draw each ks, e and d with probability ``p`` (OFA's evolution finder; at least one draw, and the
        result differs from ``arch`` in a block that runs)."""
        arch = self.validate(arch)
        key = self.to_str(arch)
        for _ in range(100):
            out = {k: list(v) for k, v in arch.items()}
            for name, choices in (("ks", self.ks_list), ("e", self.expand_list), ("d", self.depth_list)):
                for i in range(len(out[name])):
                    if rng.random() < p:
                        out[name][i] = rng.choice(choices)
            if self.to_str(out) != key:
                return out
        raise RuntimeError("OFA mutate: no change after 100 draws (is the space a single architecture?)")

    def crossover(self, a: OFAArch, b: OFAArch, rng: random.Random) -> OFAArch:
        """Uniform crossover: each ks, e and d from either parent (OFA's evolution finder)."""
        a, b = self.validate(a), self.validate(b)
        return {k: [x if rng.random() < 0.5 else y for x, y in zip(a[k], b[k], strict=True)] for k in a}
