"""Quantization library: fake quantizers, quantized layers and ``quantize_model`` (torchao-style entry point).

Knows nothing of Snakemake, MLflow or click.
"""

from zsqpipe.quant.config import QuantConfig
from zsqpipe.quant.functional import fake_quant_per_channel, fake_quant_per_tensor
from zsqpipe.quant.modules import QuantAct, QuantConv2d, QuantLinear
from zsqpipe.quant.quantize import (
    count_bitops,
    model_size_bits,
    quant_layers,
    quantize_model,
    set_quant_state,
)
from zsqpipe.quant.quantizers import QUANTIZERS, Quantizer, register_quantizer

__all__ = [
    "QUANTIZERS",
    "QuantAct",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "count_bitops",
    "fake_quant_per_channel",
    "fake_quant_per_tensor",
    "model_size_bits",
    "quant_layers",
    "quantize_model",
    "register_quantizer",
    "set_quant_state",
]
