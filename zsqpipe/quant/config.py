"""``QuantConfig``: a frozen dataclass that serialises to a plain dict (Snakemake params, MLflow, JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from zsqpipe.config import ConfigBase, Doc, Momentum, OneOf, Schema
from zsqpipe.errors import ConfigError

STE_MODES = ("identity", "clipped")
EMA_MODES = ("correct", "official")
MAX_BITS = 16
FP_BITS = 32  # bits == 32 leaves a layer in full precision


def check_bits(key: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not (1 <= value <= MAX_BITS or value == FP_BITS)
    ):
        raise ConfigError(
            f"{key}: expected an integer bit-width in 1..{MAX_BITS} (or {FP_BITS} = FP), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """How ``quantize_model`` quantizes a network.

    weight_bits / act_bits: default bit-widths of every Conv2d/Linear weight and every post-ReLU activation.
    first_layer_bits / last_layer_bits: weight bits of the first conv and last linear layer (``None`` = same as
    ``weight_bits``; the GDFQ-family papers quantize them at the same bits).
    layer_bits: per-module overrides, ``{module_name: bits}``; a Conv/Linear name sets its weight bits, a ReLU
    name (e.g. ``features.stage1.unit1.activ``) the bits of the quantizer after it.
    weight_quantizer / act_quantizer: names in the quantizer registry.
    ema_momentum, ema_mode: EMA of activation ranges (``correct``: EMA initialised with the first batch;
    ``official``: the GDFQ/HAST code's update, see docs/quantization.md).
    ste: ``identity`` (GDFQ: gradient passes unchanged, also for clipped values) or ``clipped`` (zero gradient
    outside the range, as PyTorch's fake_quantize ops).
    """

    prefix = "quant"  # how its errors name keys (ConfigBase.from_dict renames)

    weight_bits: int = 4
    act_bits: int = 4
    first_layer_bits: Annotated[
        int | None, Schema(anyOf=[{'type': 'integer', 'minimum': 1, 'maximum': 16}, {'const': 32}, {'type': 'null'}]), Doc("null (= the cell's weight bits), an integer in 1..16, or 32 (= full precision)")
    ] = None
    last_layer_bits: Annotated[
        int | None, Schema(anyOf=[{'type': 'integer', 'minimum': 1, 'maximum': 16}, {'const': 32}, {'type': 'null'}]), Doc("null (= the cell's weight bits), an integer in 1..16, or 32 (= full precision)")
    ] = None
    layer_bits: Annotated[
        dict[str, int], Schema(additionalProperties={'description': 'a bit-width: an integer in 1..16, or 32 (= full precision)', 'anyOf': [{'type': 'integer', 'minimum': 1, 'maximum': 16}, {'const': 32}]})
    ] = field(default_factory=dict)
    weight_quantizer: Annotated[
        str, OneOf("minmax_channel", "lsq", "lsq_tensor", "lsq_nopost", "lsq_nopost_fixed"), Doc("lsq* = learned step size (docs/methods/lsq.md)")
    ] = "minmax_channel"
    act_quantizer: Annotated[
        str, OneOf("ema_minmax", "ema_mse", "lsq", "lsq_nopost", "lsq_nopost_fixed"),
        Doc("ema_mse = each batch's MSE-optimal clip, then the EMA (docs/quantization.md)")
    ] = "ema_minmax"
    ema_momentum: Momentum = 0.9
    ema_mode: Annotated[str, OneOf("correct", "official")] = "correct"
    ste: Annotated[str, OneOf("identity", "clipped")] = "identity"

    def __post_init__(self):
        check_bits("quant.weight_bits", self.weight_bits)
        check_bits("quant.act_bits", self.act_bits)
        for key in ("first_layer_bits", "last_layer_bits"):
            if getattr(self, key) is not None:
                check_bits(f"quant.{key}", getattr(self, key))
        if not isinstance(self.layer_bits, dict):
            raise ConfigError(
                f"quant.layer_bits: expected a mapping of module name to bits, got {self.layer_bits!r}"
            )
        for name, bits in self.layer_bits.items():
            check_bits(f"quant.layer_bits.{name}", bits)
        if self.ste not in STE_MODES:
            raise ConfigError(f"quant.ste: expected one of {list(STE_MODES)}, got {self.ste!r}")
        if self.ema_mode not in EMA_MODES:
            raise ConfigError(f"quant.ema_mode: expected one of {list(EMA_MODES)}, got {self.ema_mode!r}")
        if not (isinstance(self.ema_momentum, int | float) and 0.0 <= self.ema_momentum < 1.0):
            raise ConfigError(f"quant.ema_momentum: expected a number in [0, 1), got {self.ema_momentum!r}")
