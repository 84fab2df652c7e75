"""``quantize_model(model, QuantConfig)``: swap layers for quantized ones, in place (torchao ``quantize_`` style).

- every ``nn.Conv2d``/``nn.Linear`` becomes ``QuantConv2d``/``QuantLinear`` with a weight quantizer;
- every ``nn.ReLU``/``nn.ReLU6`` becomes ``Sequential(relu, QuantAct)`` (activations are quantized only after
  ReLU, as in GDFQ/HAST: the network input and MobileNetV2's residual sums stay full precision);
- BatchNorm is kept and not folded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.quant.config import FP_BITS, QuantConfig
from zsqpipe.quant.modules import QuantAct, QuantConv2d, QuantLinear
from zsqpipe.quant.quantizers import Quantizer, create_quantizer

_QUANT_LAYERS = (QuantConv2d, QuantLinear)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Quantize ``model`` in place according to ``cfg`` and return it."""
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) or hasattr(m, "attach_weight_quantizer")
    ]
    acts = [(n, m) for n, m in model.named_modules() if type(m) in (nn.ReLU, nn.ReLU6)]
    if not layers:
        raise ConfigError("quantize_model: the model has no Conv2d/Linear layer to quantize")
    known = {n for n, _ in layers} | {n for n, _ in acts}
    unknown = sorted(set(cfg.layer_bits) - known)
    if unknown:
        raise ConfigError(
            f"quant.layer_bits.{unknown[0]}: no Conv2d/Linear/ReLU module of that name in the model"
        )
    first, last = layers[0][0], layers[-1][0]
    for name, layer in layers:
        bits = cfg.weight_bits
        if name == first and cfg.first_layer_bits is not None:
            bits = cfg.first_layer_bits
        if name == last and cfg.last_layer_bits is not None:
            bits = cfg.last_layer_bits
        bits = cfg.layer_bits.get(name, bits)
        wq = create_quantizer(cfg.weight_quantizer, "weight", bits, ste=cfg.ste)
        if hasattr(layer, "attach_weight_quantizer"):  # a dynamic (weight-slicing) layer keeps its module
            layer.attach_weight_quantizer(wq)
            continue
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _set_module(model, name, cls.from_float(layer, wq))
    for name, act in acts:
        bits = cfg.layer_bits.get(name, cfg.act_bits)
        aq = create_quantizer(
            cfg.act_quantizer, "act", bits, ste=cfg.ste, momentum=cfg.ema_momentum, ema_mode=cfg.ema_mode
        )
        aq.inplace_input = True  # it reads the ReLU's output only: evaluation may quantize that in place
        _set_module(model, name, nn.Sequential(act, QuantAct(aq)))
    return model


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QUANT_LAYERS)]


def set_quant_state(model: nn.Module, enabled: bool | None = None, update_ranges: bool | None = None) -> None:
    """Switch fake quantization and range calibration on/off for every quantizer of ``model``.

    ``update_ranges=True`` lets activation ranges follow the data (calibration); ``False`` freezes them.
    """
    for q in quantizers(model):
        if enabled is not None:
            q.enabled = enabled
        if update_ranges is not None:
            q.update_ranges = update_ranges


@dataclass
class LayerOps:
    name: str
    macs: int
    weight_bits: int
    act_bits: int

    @property
    def bitops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits


@torch.no_grad()
def count_bitops(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerOps]:
    """MACs and bit-operations per Conv2d/Linear layer for one input of ``input_shape`` (C, H, W).

    BitOPs = MACs x weight bits x input-activation bits. An input produced by an activation quantizer counts at
    its bits; any other input (the image, pooled or residual-sum tensors) counts as 32-bit, and unquantized
    layers count 32-bit weights.
    """
    records: list[LayerOps] = []
    hooks = []

    def tag(_m, _inp, out):
        out._zsq_bits = _m.bits

    def count(name):
        def hook(m, inp, out):
            x = inp[0]
            act_bits = getattr(x, "_zsq_bits", FP_BITS)
            weight_bits = m.weight_quantizer.bits if isinstance(m, _QUANT_LAYERS) else FP_BITS
            if hasattr(m, "active_macs"):  # a dynamic layer running a slice of its weight
                macs = m.active_macs(out)
            elif isinstance(m, nn.Conv2d):
                macs = (
                    out.numel()
                    // out.shape[0]
                    * (m.in_channels // m.groups)
                    * m.kernel_size[0]
                    * m.kernel_size[1]
                )
            else:
                macs = out.numel() // out.shape[0] * m.in_features
            records.append(LayerOps(name, int(macs), min(weight_bits, FP_BITS), min(act_bits, FP_BITS)))

        return hook

    for name, m in model.named_modules():
        if isinstance(m, QuantAct):
            hooks.append(m.register_forward_hook(tag))
        elif isinstance(m, nn.Conv2d | nn.Linear):
            hooks.append(m.register_forward_hook(count(name)))
    was_training = model.training
    model.eval()
    states = [(q, q.update_ranges, q.enabled) for q in quantizers(model)]
    for q, _, _ in states:  # shapes only: no calibration needed, ranges untouched
        q.update_ranges, q.enabled = False, False
    try:
        p = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        for q, upd, en in states:
            q.update_ranges, q.enabled = upd, en
        model.train(was_training)
    return records


def model_size_bits(model: nn.Module) -> int:
    """Storage of the model in bits: quantized weights at their bits, every other parameter at 32 bits."""
    total = 0
    quantized = set()
    for _, m in quant_layers(model):
        total += m.weight.numel() * min(m.weight_quantizer.bits, FP_BITS)
        quantized.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            total += p.numel() * FP_BITS
    return total
