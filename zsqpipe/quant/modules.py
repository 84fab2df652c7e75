"""Quantized layers: Conv2d/Linear with a weight quantizer, and ``QuantAct`` (activation quantizer).

``QuantConv2d``/``QuantLinear`` subclass the float layers, so parameter names (``weight``, ``bias``) and FP
checkpoints stay compatible; the weight quantizer is a child module ``weight_quantizer``.
"""

from __future__ import annotations

from torch import nn

from zsqpipe.quant.quantizers import Quantizer


class QuantConv2d(nn.Conv2d):
    weight_quantizer: Quantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: Quantizer) -> QuantConv2d:
        q = cls(  # built on the meta device: no throw-away init, no draw from the global RNG
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        q.weight = conv.weight
        q.bias = conv.bias
        q.weight_quantizer = weight_quantizer
        return q

    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    weight_quantizer: Quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: Quantizer) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight = linear.weight
        q.bias = linear.bias
        q.weight_quantizer = weight_quantizer
        return q

    def forward(self, x):
        return nn.functional.linear(x, self.weight_quantizer(self.weight), self.bias)


class QuantAct(nn.Module):
    """Wraps an activation quantizer; inserted after each ReLU/ReLU6 as ``Sequential(relu, QuantAct)``."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.quantizer = quantizer

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def forward(self, x):
        return self.quantizer(x)
