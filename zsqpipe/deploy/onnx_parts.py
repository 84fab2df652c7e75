"""Parts of the ONNX export (``zsqpipe.deploy.onnx_export``): the integer grid of each quantizer (activation
step and integer range; weight levels and per-channel step), BatchNorm folding, int8 level spreading, and the
growing ONNX graph."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from zsqpipe.errors import ZsqError
from zsqpipe.quant.functional import qparams
from zsqpipe.quant.quantizers import EMAMinMaxQuantizer, LSQQuantizer, MinMaxChannelQuantizer, Quantizer


class ExportError(ZsqError):
    """The model holds something the exporter cannot write as integer ONNX (the message names the layer)."""


class Graph:
    """A growing ONNX graph: unique names, initializers from numpy arrays, nodes."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self.names = [], [], set()

    def name(self, hint: str) -> str:
        base = hint.replace(".", "_") or "t"
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, array, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def prune(self, output: str) -> None:
        """Drop nodes and initializers ``output`` does not depend on (e.g. the float pooled features left unused
        when the classifier runs on the integer map), so that the runtime does not compute them."""
        needed, kept = {output}, []
        for n in reversed(self.nodes):
            if needed.intersection(n.output):
                kept.append(n)
                needed.update(n.input)
        self.nodes = kept[::-1]
        self.inits = [t for t in self.inits if t.name in needed]

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=self.name(f"{hint}_{op}"), **attrs))
        return out


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def act_grid(name: str, q: Quantizer) -> tuple[float, float, int, int]:
    """(quantize step, dequantize step, lowest integer, highest integer) of an active activation quantizer."""
    n = 2**q.bits - 1
    if isinstance(q, EMAMinMaxQuantizer):
        if not q._has_range:
            raise ExportError(f"{name}: activation quantizer has no calibrated range; nothing to export")
        scale, zp = qparams(q.x_min.reshape(()).float(), q.x_max.reshape(()).float(), q.bits)
        a = int(-zp.item())
        return float(scale), float(scale), a, a + n
    if isinstance(q, LSQQuantizer) and not q.per_channel:
        s = float(q.scale.detach().clamp_min(1e-8).reshape(()))
        post = q._post(q.scale)
        dq = s / q.gamma if post is None else float(torch.as_tensor(post).reshape(()))
        return s / q.gamma, dq, q.q_n, q.q_p
    raise ExportError(f"{name}: activation quantizer {type(q).__name__} cannot be exported to ONNX")


def weight_grid(name: str, layer: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """(integer levels, per-output-channel dequantization step) of a quantized layer's weight; None = float."""
    wq: Quantizer = layer.weight_quantizer
    if not wq.active:
        return None
    w = layer.weight.detach().float()
    if isinstance(wq, MinMaxChannelQuantizer):
        flat = w.flatten(1)
        scale = qparams(flat.min(1).values, flat.max(1).values, wq.bits)[0]
    elif isinstance(wq, LSQQuantizer):
        s = wq._step(w).to(w.dtype).reshape(-1)
        post = wq._post(w)
        scale = s / wq.gamma if post is None else torch.as_tensor(post, dtype=w.dtype).reshape(-1)
        scale = scale.expand(w.shape[0]) if scale.numel() == 1 else scale
    else:
        raise ExportError(f"{name}: weight quantizer {type(wq).__name__} cannot be exported to ONNX")
    levels = wq.levels(w).to(torch.int64)
    fake = wq(w)
    view = (-1,) + (1,) * (w.dim() - 1)
    err = (levels.to(w.dtype) * scale.view(view) - fake).abs().max().item()
    if err > 1e-5 * max(w.abs().max().item(), 1e-12):
        raise ExportError(
            f"{name}: weight quantizer output is not integer levels x scale (max error {err:.3g})"
        )
    return levels.numpy(), scale.double().numpy()


def spread(ints: np.ndarray) -> np.ndarray:
    """Per output channel, the largest integer k with k * q still in int8 (k * q at step s / k is the same weight).

    QLinearConv adds the bias as an int32 on the step s_x * s_w: rounding it there moves every output by up to
    0.5 * s_x * s_w, a few percent of a 3-bit output step, enough to flip ~1 % of the levels of a layer (measured,
    docs/deploy.md). Spreading the levels makes that step k times finer at no cost (the kernel is int8 anyway).
    """
    peak = np.abs(ints.reshape(ints.shape[0], -1)).max(1)
    return np.maximum(127 // np.maximum(peak, 1), 1).astype(np.int64)


def fold_bn(bn: nn.BatchNorm2d | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (factor, shift) of an eval-mode BatchNorm: y = factor * x + shift; identity without one."""
    if bn is None:
        return np.ones(channels), np.zeros(channels)
    if bn.running_mean is None or bn.running_var is None:
        raise ExportError("BatchNorm without running statistics cannot be folded (track_running_stats=False)")
    sigma = torch.sqrt(bn.running_var.double() + bn.eps)
    g = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    factor = g / sigma
    return factor.numpy(), (b - bn.running_mean.double() * factor).numpy()
