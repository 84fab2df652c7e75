"""Export a fake-quantized model (``quantize_model``) to ONNX in QDQ form, for integer kernels in onnxruntime.

The fake-quantized forward is rebuilt op by op from a ``torch.fx`` trace (docs/deploy.md):

- weights: the integer levels q of the weight quantizer, stored as an int8 initializer with zero point 0, and
  a per-output-channel ``DequantizeLinear`` scale. Every grid we train is x_hat = s * clamp(round(x / s), a,
  a + 2^b - 1) (GDFQ's asymmetric min-max, LSQ's signed grid), i.e. exactly the integer tensor q times s.
- BatchNorm after a conv is folded exactly into the integers' scale: w_hat * g / sigma = (|g| s / sigma) * (sign(g) q),
  so the integers only flip sign where gamma < 0; the bias becomes beta - g * mu / sigma (+ the conv bias * g / sigma).
- an activation quantizer becomes QuantizeLinear (zero point 0, round half to even as torch.round) followed
  by an integer ``Clip`` to the grid [max(a, 0), a + 2^b - 1] and ``DequantizeLinear``. The clip sits after the
  quantize, on the integers (the same values as Clip(s * a, s * (a + 2^b - 1)) before it), so that
  Conv -> QuantizeLinear stays adjacent and onnxruntime fuses DQ -> Conv -> Q into ``QLinearConv``; the ReLU
  before the quantizer is dropped (the quantize saturates at 0), ReLU6's cap becomes the clip's upper bound.
- a conv whose input is quantized but whose output is not (ResNet's second conv and shortcut, added before the
  ReLU) runs as ``ConvInteger`` (exact int32 accumulation) times s_x * s_w plus the float bias; a linear layer
  with a quantized input as ``MatMulInteger``.
- the classifier after global average pooling of a quantized activation: linear(mean(x)) = mean(linear(x)),
  a 1x1 ``ConvInteger`` on the integer map, the mean of its exact int32 sums, then scale and bias;
- the first conv reads the network input x = (p / 255 - mean) / std of 8-bit pixels p (``PixelInput``): the
  graph recovers p exactly (QuantizeLinear of x - b on the step a = 1 / (255 std)) and runs ``ConvInteger`` on
  it; with zero padding in x, conv(x) = a * conv(p) + conv(b * M) (M = 1 inside the image, 0 in the padding),
  the second term a constant map that onnxruntime folds at load time (channels of unequal std: one ConvInteger
  per group of equal a);
- what the fake-quantized model computes in float stays float: a layer whose *input* is not quantized
  (MobileNetV2's residual sums; the network input when no ``PixelInput`` is given) runs a float Conv/Gemm on
  the dequantized integer weights; a layer with weight bits 32 is a float layer. ``ExportReport.layers`` says
  which is which.

Anything else (an unknown module or quantizer, weights off the int8 range) is refused with one line naming the layer.
The quantizer grids, BatchNorm folding and the graph builder live in ``zsqpipe.deploy.onnx_parts``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from zsqpipe.deploy.onnx_parts import ExportError, Graph, act_grid, f32, fold_bn, spread, weight_grid
from zsqpipe.io import atomic_path
from zsqpipe.quant.modules import QuantAct, QuantConv2d, QuantLinear

OPSET = 21
MAX_WEIGHT_PARTS = 3  # int8 parts per integer weight (8-bit asymmetric levels reach +-255)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_LEAVES = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, QuantAct, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
    nn.MaxPool2d, nn.Dropout, nn.Identity,
)  # fmt: skip


@dataclass
class LayerExport:
    """How one Conv2d/Linear runs in the exported graph."""

    name: str
    kind: str  # "conv" | "linear"
    kernel: str  # "QLinearConv" (QDQ, fused by onnxruntime) | "ConvInteger" | "MatMulInteger" | "float"
    weight_bits: int
    reason: str = ""  # why it stays float


@dataclass
class ExportReport:
    path: str
    opset: int
    quantized: bool
    layers: list[LayerExport] = field(default_factory=list)
    act_quantizers: int = 0

    @property
    def float_layers(self) -> list[LayerExport]:
        return [lay for lay in self.layers if lay.kernel == "float"]


@dataclass
class _Q:
    """A quantized activation: the integer tensor, its dequantization step and dtype."""

    name: str
    scale: float
    dtype: str  # "uint8" | "int8"


@dataclass(frozen=True)
class PixelInput:
    """The network input is x = (p / levels - mean) / std per channel, p integer pixels in [0, levels] (how every
    data set of zsqpipe feeds 8-bit images): x = a * p + b with a = 1 / (levels std), b = -mean / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    levels: int = 255

    @property
    def step(self) -> np.ndarray:
        return 1.0 / (self.levels * np.asarray(self.std, np.float64))

    @property
    def offset(self) -> np.ndarray:
        return -np.asarray(self.mean, np.float64) / np.asarray(self.std, np.float64)


@dataclass
class _Value:
    name: str  # the float tensor (the dequantized one for a quantized activation)
    q: _Q | None = None
    pooled: _Q | None = None  # a global average of this quantized activation (a classifier's input)
    pixels: PixelInput | None = None  # the network input, made of integer pixels


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


class _Exporter:
    def __init__(
        self, model: nn.Module, quantized: bool, mode: str = "exact", pixels: PixelInput | None = None,
        input_shape: tuple[int, ...] = (),
    ):  # fmt: skip
        self.quantized, self.mode, self.pixels, self.input_shape = quantized, mode, pixels, input_shape
        self.pixel_names: dict[tuple[int, ...], str] = {}  # channel group -> its uint8 pixel tensor
        self.modules = dict(model.named_modules())
        self.g = Graph()
        self.values: dict[fx.Node, _Value] = {}
        self.skip: set[fx.Node] = set()
        self.relu_before: dict[fx.Node, str] = {}  # QuantAct node -> "relu"/"relu6" dropped before it
        self.report_layers: list[LayerExport] = []
        self.act_count = 0

    # -- helpers -----------------------------------------------------------------------------------------
    def mod(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    @staticmethod
    def sole_user(node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def active_act(self, node: fx.Node | None) -> bool:
        m = self.mod(node) if node is not None else None
        return isinstance(m, QuantAct) and self.quantized and m.quantizer.active

    def quantize_act(self, x: str, qnode: fx.Node, relu: str | None) -> _Value:
        """QuantizeLinear -> integer Clip -> DequantizeLinear of the activation quantizer at ``qnode``."""
        name = qnode.target
        q_step, dq_step, lo, hi = act_grid(name, self.mod(qnode).quantizer)
        if relu is not None:
            lo = max(lo, 0)
            if relu == "relu6":  # round is monotone: min(round(6 / s), hi) caps as ReLU6 before rounding did
                hi = min(hi, int(torch.round(torch.tensor(6.0) * (1.0 / torch.tensor(q_step)))))
        dtype = "uint8" if lo >= 0 else "int8"
        info = np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise ExportError(f"{name}: activation grid [{lo}, {hi}] does not fit {dtype}")
        g = self.g
        zp = g.const(np.zeros((), dtype), f"{name}.zp")
        qi = g.node("QuantizeLinear", [x, g.const(f32(q_step), f"{name}.step"), zp], f"{name}.q")
        qc = g.node("Clip", [qi, g.const(np.array(lo, dtype), f"{name}.lo"), g.const(np.array(hi, dtype), f"{name}.hi")],
                    f"{name}.qclip")  # fmt: skip
        dq_scale = g.const(f32(dq_step), f"{name}.dq_step")
        out = g.node("DequantizeLinear", [qc, dq_scale, zp], f"{name}.dq")
        self.act_count += 1
        return _Value(out, _Q(qc, dq_step, dtype))

    # -- layers --------------------------------------------------------------------------------------------
    def conv_or_linear(self, node: fx.Node) -> None:
        layer = self.mod(node)
        name = node.target
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        x = self.values[node.args[0]]
        out_node, bn = node, None
        nxt = self.sole_user(node)
        if kind == "conv" and nxt is not None and isinstance(self.mod(nxt), nn.BatchNorm2d):
            bn, out_node = self.mod(nxt), nxt
            self.skip.add(nxt)
        channels = layer.weight.shape[0]
        factor, shift = fold_bn(bn, channels)
        bias = shift + (layer.bias.detach().double().numpy() * factor if layer.bias is not None else 0.0)
        quant_layer = self.quantized and isinstance(layer, QuantConv2d | QuantLinear)
        grid = weight_grid(name, layer) if quant_layer else None
        weight_bits = layer.weight_quantizer.bits if isinstance(layer, QuantConv2d | QuantLinear) else 32
        g = self.g
        # an activation quantizer right after (through an optional ReLU/ReLU6): fuse Conv -> Q (QLinearConv)
        act_node, relu = None, None
        after = self.sole_user(out_node)
        if kind == "conv" and grid is not None and after is not None:
            m = self.mod(after)
            if isinstance(m, nn.ReLU | nn.ReLU6) and self.active_act(self.sole_user(after)):
                act_node, relu = self.sole_user(after), "relu6" if isinstance(m, nn.ReLU6) else "relu"
                self.skip.update({after, act_node})
            elif self.active_act(after):
                act_node = after
                self.skip.add(after)
        conv_attrs = {}
        if kind == "conv":
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ExportError(f"{name}: padding {layer.padding!r}/{layer.padding_mode!r} is not exportable")
            ph, pw = layer.padding
            conv_attrs = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                              pads=[ph, pw, ph, pw], dilations=list(layer.dilation), group=layer.groups)  # fmt: skip
        if grid is None:  # float weights (bits 32, or the float FP32 export)
            w = layer.weight.detach().double().numpy()
            w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
            wname = g.const(f32(w), f"{name}.weight")
            kernel, reason = "float", "weight bits 32" if self.quantized else "FP32 export"
        else:
            levels, step = grid
            sign = np.where(factor < 0, -1, 1)
            ints = levels * sign.reshape((-1,) + (1,) * (levels.ndim - 1))
            if np.abs(ints).max() > 127 * MAX_WEIGHT_PARTS:
                raise ExportError(f"{name}: integer weights [{ints.min()}, {ints.max()}] do not fit int8 x {MAX_WEIGHT_PARTS}")
            w_step = step * np.abs(factor)
            w_step = np.where(w_step > 0, w_step, np.finfo(np.float32).tiny)
        fits_int8 = grid is not None and np.abs(ints).max() <= 127
        fused = self.mode == "qlinear" and act_node is not None and fits_int8
        if grid is not None and kind == "conv" and x.q is None and x.pixels is not None and layer.groups == 1:
            kernel, reason = "ConvInteger", ""
            y = self._pixel_conv(x, ints, w_step, bias, name, conv_attrs)
        elif grid is not None and kind == "linear" and x.q is None and x.pooled is not None:
            # linear(mean(x)) = mean(linear(x)): a 1x1 ConvInteger on the quantized map, the mean of its exact
            # int32 sums, then the float scale and bias (the classifier after global average pooling)
            kernel, reason = "ConvInteger", ""
            acc = self._integer_acc(x.pooled, ints[:, :, None, None], name, "conv", {"kernel_shape": [1, 1]})
            mean = g.node("ReduceMean", [g.node("Cast", [acc], f"{name}.acc_f", to=1),
                                         g.const(np.array([2, 3], np.int64), f"{name}.axes")],
                          f"{name}.pooled", keepdims=0)  # fmt: skip
            y = self._scale_bias(mean, x.pooled.scale * w_step, bias, name, conv=False)
        elif grid is not None and x.q is not None and (kind == "linear" or not fused):
            kernel, reason = ("ConvInteger", "") if kind == "conv" else ("MatMulInteger", "")
            acc = self._integer_acc(x.q, ints, name, kind, conv_attrs)
            y = self._rescale(acc, x.q.scale * w_step, bias, name, conv=kind == "conv")
        else:
            if grid is not None:
                if x.q is not None:  # QLinearConv: spread the b-bit levels over int8 (k * q, step / k), see spread
                    k = spread(ints)
                    ints, w_step = ints * k.reshape((-1,) + (1,) * (ints.ndim - 1)), w_step / k
                wdtype = np.int8 if fits_int8 else np.int16
                w_int = g.const(ints.astype(wdtype), f"{name}.weight_q")
                wzp = g.const(np.zeros(channels, wdtype), f"{name}.weight_zp")
                wname = g.node("DequantizeLinear", [w_int, g.const(f32(w_step), f"{name}.weight_step"), wzp],
                               f"{name}.weight_dq", axis=0)  # fmt: skip
                kernel, reason = ("QLinearConv", "") if x.q is not None else ("float", "input not quantized")
            if grid is not None and x.q is not None:  # QDQ bias: int32 on the step s_x * s_w
                b_step = x.q.scale * w_step
                b_int = np.clip(np.round(bias / b_step), -(2**31), 2**31 - 1).astype(np.int32)
                bname = g.node("DequantizeLinear", [g.const(b_int, f"{name}.bias_q"), g.const(f32(b_step), f"{name}.bias_step"),
                                                    g.const(np.zeros(channels, np.int32), f"{name}.bias_zp")],
                               f"{name}.bias_dq", axis=0)  # fmt: skip
            else:
                bname = g.const(f32(bias), f"{name}.bias")
            if kind == "conv":
                y = g.node("Conv", [x.name, wname, bname], f"{name}.out", **conv_attrs)
            else:
                y = g.node("Gemm", [x.name, wname, bname], f"{name}.out", transB=1)
        self.report_layers.append(LayerExport(name, kind, kernel, weight_bits, reason))
        if act_node is not None:
            self.values[act_node] = self.quantize_act(y, act_node, relu)
        else:
            self.values[out_node] = _Value(y)

    def _integer_acc(self, xq: _Q, ints: np.ndarray, name: str, kind: str, conv_attrs: dict) -> str:
        """int32 accumulator of the quantized input times the integer weights: ConvInteger / MatMulInteger with
        int8 weights and zero points 0; levels beyond int8 (8-bit asymmetric grids reach +-255) are split into
        int8 parts q = q_1 + q_2 + ... whose accumulators are added in int32 (exact)."""
        g = self.g
        parts, rest = [], ints.copy()
        while True:
            part = np.clip(rest, -127, 127)
            parts.append(part)
            rest = rest - part
            if not rest.any():
                break
        zx = g.const(np.zeros((), xq.dtype), f"{name}.x_zp")
        zw = g.const(np.zeros((), np.int8), f"{name}.w_zp")
        accs = []
        for i, part in enumerate(parts):
            tag = f"{name}.weight_q" + (f"{i + 1}" if len(parts) > 1 else "")
            if kind == "conv":
                w = g.const(part.astype(np.int8), tag)
                accs.append(g.node("ConvInteger", [xq.name, w, zx, zw], f"{name}.acc", **conv_attrs))
            else:
                w = g.const(np.ascontiguousarray(part.T).astype(np.int8), tag + "t")
                accs.append(g.node("MatMulInteger", [xq.name, w, zx, zw], f"{name}.acc"))
        acc = accs[0]
        for other in accs[1:]:
            acc = g.node("Add", [acc, other], f"{name}.acc_sum")
        return acc

    def _pixel_conv(self, x: _Value, ints: np.ndarray, w_step: np.ndarray, bias: np.ndarray, name: str,
                    conv_attrs: dict) -> str:  # fmt: skip
        """conv(x) of the network input x = a * p + b on integer pixels p (:class:`PixelInput`): per group of
        channels with the same step a, ConvInteger(p, q) * a; plus conv(b * M) (b where the image is, 0 in the
        zero padding) on the same integer weights, a constant map folded by onnxruntime; times s_w, plus bias."""
        g, pix = self.g, x.pixels
        a, b = pix.step, pix.offset
        channels = len(a)
        if ints.shape[1] != channels or len(self.input_shape) != 3 or self.input_shape[0] != channels:
            raise ExportError(f"{name}: PixelInput has {channels} channels, the layer reads {ints.shape[1]}")
        if "p" not in self.pixel_names:  # p = round((x - b) / a), saturated to [0, levels] (uint8)
            shifted = g.node("Sub", [x.name, g.const(f32(b).reshape(1, -1, 1, 1), "input.offset")], "input.shifted")
            if pix.levels > 255:
                raise ExportError(f"{name}: PixelInput levels {pix.levels} do not fit uint8")
            self.pixel_names["p"] = g.node(
                "QuantizeLinear", [shifted, g.const(f32(a), "input.step"), g.const(np.zeros(channels, np.uint8), "input.zp")],
                "input.pixels", axis=1,
            )  # fmt: skip
        total = None
        for step in np.unique(a):
            group = tuple(int(c) for c in np.flatnonzero(a == step))
            if group not in self.pixel_names:
                self.pixel_names[group] = (
                    self.pixel_names["p"] if len(group) == channels else
                    g.node("Gather", [self.pixel_names["p"], g.const(np.array(group, np.int64), "input.channels")],
                           "input.pixels_group", axis=1)
                )  # fmt: skip
            acc = self._integer_acc(_Q(self.pixel_names[group], float(step), "uint8"), ints[:, list(group)], name,
                                    "conv", conv_attrs)  # fmt: skip
            part = g.node("Mul", [g.node("Cast", [acc], f"{name}.acc_f", to=1), g.const(f32(step), f"{name}.pixel_step")],
                          f"{name}.pixel_part")  # fmt: skip
            total = part if total is None else g.node("Add", [total, part], f"{name}.pixel_sum")
        # conv(b * M): the offset image, zero-padded like x, through the integer weights (all inputs constant)
        offset_img = g.node("Expand", [g.const(f32(b).reshape(1, -1, 1, 1), f"{name}.offset"),
                                       g.const(np.array([1, *self.input_shape], np.int64), f"{name}.offset_shape")],
                            f"{name}.offset_image")  # fmt: skip
        w_float = g.node("Cast", [g.const(ints.astype(np.int16), f"{name}.weight_q16")], f"{name}.weight_levels", to=1)
        offset_map = g.node("Conv", [offset_img, w_float], f"{name}.offset_map", **conv_attrs)
        total = g.node("Add", [total, offset_map], f"{name}.levels_out")
        return self._scale_bias(total, w_step, bias, name, conv=True)

    def _scale_bias(self, f: str, step: np.ndarray, bias: np.ndarray, name: str, conv: bool) -> str:
        """float f -> f * step + bias, per output channel (axis 1 of an NCHW map, or of an N x C matrix)."""
        g = self.g
        shape = (1, -1, 1, 1) if conv else (1, -1)
        f = g.node("Mul", [f, g.const(f32(step).reshape(shape), f"{name}.acc_step")], f"{name}.scaled")
        return g.node("Add", [f, g.const(f32(bias).reshape(shape), f"{name}.bias")], f"{name}.out")

    def _rescale(self, acc: str, step: np.ndarray, bias: np.ndarray, name: str, conv: bool) -> str:
        """int32 accumulator -> float: acc * (s_x * s_w) + bias, per output channel."""
        f = self.g.node("Cast", [acc], f"{name}.acc_f", to=1)  # FLOAT
        return self._scale_bias(f, step, bias, name, conv)

    # -- graph ---------------------------------------------------------------------------------------------
    def run(self, graph: fx.Graph) -> str:
        g = self.g
        out = None
        for node in graph.nodes:
            if node in self.skip:
                continue
            if node.op == "placeholder":
                self.values[node] = _Value(INPUT_NAME, pixels=self.pixels if self.quantized else None)
                g.names.add(INPUT_NAME)
            elif node.op == "output":
                out = self.values[node.args[0]].name
            elif node.op == "call_module":
                self.module_node(node)
            elif node.op in ("call_function", "call_method"):
                self.function_node(node)
            else:
                raise ExportError(f"cannot export {node.op} node {node.name!r} ({node.target})")
        return out

    def module_node(self, node: fx.Node) -> None:
        m, name, g = self.mod(node), node.target, self.g
        x = self.values[node.args[0]]
        if isinstance(m, nn.Conv2d | nn.Linear):
            return self.conv_or_linear(node)
        if isinstance(m, QuantAct):
            if not self.active_act(node):
                self.values[node] = x
            else:
                self.values[node] = self.quantize_act(x.name, node, self.relu_before.get(node))
        elif isinstance(m, nn.ReLU | nn.ReLU6):
            nxt = self.sole_user(node)
            if self.active_act(nxt):  # the quantizer's saturation at 0 (and clip) is the ReLU
                self.relu_before[nxt] = "relu6" if isinstance(m, nn.ReLU6) else "relu"
                self.values[node] = x
            elif isinstance(m, nn.ReLU):
                self.values[node] = _Value(g.node("Relu", [x.name], f"{name}.out"))
            else:
                lo, hi = g.const(f32(0.0), f"{name}.lo"), g.const(f32(6.0), f"{name}.hi")
                self.values[node] = _Value(g.node("Clip", [x.name, lo, hi], f"{name}.out"))
        elif isinstance(m, nn.BatchNorm2d):
            raise ExportError(f"{name}: BatchNorm that does not follow a conv cannot be folded")
        elif isinstance(m, nn.Dropout | nn.Identity):
            self.values[node] = x
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if tuple(np.atleast_1d(m.output_size)) not in ((1,), (1, 1)):
                raise ExportError(f"{name}: AdaptiveAvgPool2d to {m.output_size} (only 1x1 is exportable)")
            self.values[node] = _Value(g.node("GlobalAveragePool", [x.name], f"{name}.out"), pooled=x.q)
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            k, s, p = (np.broadcast_to(np.asarray(v), (2,)).tolist() for v in (m.kernel_size, m.stride, m.padding))
            attrs = dict(kernel_shape=k, strides=s, pads=p + p)
            if isinstance(m, nn.MaxPool2d) and x.q is not None:  # the max of integers is on the same grid
                qi = g.node("MaxPool", [x.q.name], f"{name}.q_out", **attrs)
                zp = g.const(np.zeros((), x.q.dtype), f"{name}.zp")
                dq = g.node("DequantizeLinear", [qi, g.const(f32(x.q.scale), f"{name}.dq_step"), zp], f"{name}.out")
                self.values[node] = _Value(dq, _Q(qi, x.q.scale, x.q.dtype))
            else:
                op = "MaxPool" if isinstance(m, nn.MaxPool2d) else "AveragePool"
                if op == "AveragePool":
                    attrs["count_include_pad"] = int(m.count_include_pad)
                self.values[node] = _Value(g.node(op, [x.name], f"{name}.out", **attrs))
        else:
            raise ExportError(f"{name}: {type(m).__name__} cannot be exported to ONNX")

    def function_node(self, node: fx.Node) -> None:
        g, t = self.g, node.target
        if t in (operator.add, torch.add, "add", operator.iadd, "add_"):
            a, b = (self.values[arg].name for arg in node.args[:2])
            self.values[node] = _Value(g.node("Add", [a, b], node.name))
        elif t in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise ExportError(f"{node.name}: flatten({start}, {end}) is not exportable (only flatten(1))")
            x = self.values[node.args[0]]
            self.values[node] = _Value(g.node("Flatten", [x.name], node.name, axis=1), pooled=x.pooled)
        elif t is nn.functional.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
            if tuple(np.atleast_1d(size)) not in ((1,), (1, 1)):
                raise ExportError(f"{node.name}: adaptive_avg_pool2d to {size} (only 1x1 is exportable)")
            x = self.values[node.args[0]]
            self.values[node] = _Value(g.node("GlobalAveragePool", [x.name], node.name), pooled=x.q)
        elif t is nn.functional.dropout:
            self.values[node] = self.values[node.args[0]]
        else:
            raise ExportError(f"cannot export {node.op} {getattr(t, '__name__', t)!r} at node {node.name!r}")


MODES = ("exact", "qlinear")


def _export(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path, quantized: bool, mode: str = "exact",
    pixels: PixelInput | None = None,
) -> ExportReport:  # fmt: skip
    import onnx
    from onnx import TensorProto, helper

    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - an untraceable model: one line, the cause
        raise ExportError(f"cannot trace {type(model).__name__} with torch.fx: {str(e).splitlines()[0]}") from e
    if mode not in MODES:
        raise ExportError(f"export mode: expected one of {list(MODES)}, got {mode!r}")
    ex = _Exporter(model, quantized, mode, pixels, input_shape)
    with torch.no_grad():
        out = ex.run(graph)
    g = ex.g
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
    g.prune(OUTPUT_NAME)
    num_classes = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            num_classes = m.out_features
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape])
    outp = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])
    onnx_graph = helper.make_graph(g.nodes, f"zsqpipe_{type(model).__name__}", [inp], [outp], g.inits)
    m = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="zsqpipe")
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(m, str(tmp))
    return ExportReport(str(path), OPSET, quantized, ex.report_layers, ex.act_count)


def export_onnx(
    model: nn.Module, input_shape: tuple[int, ...], path: str | Path, mode: str = "exact",
    pixels: PixelInput | None = None,
) -> ExportReport:  # fmt: skip
    """Write the fake-quantized ``model`` (eval mode; inputs of shape (N, *input_shape)) as a QDQ ONNX graph.

    ``mode``: ``exact`` runs every conv with a quantized input as ConvInteger (int32 accumulation, then the
    float scale and bias: the fake-quant arithmetic, bit for bit in practice); ``qlinear`` writes the QDQ
    pattern that onnxruntime fuses into QLinearConv where an activation quantizer follows, its bias an int32 on
    the step s_x * s_w / k (module docstring, :func:`spread`). ``pixels``: the input is normalized 8-bit pixels
    (:class:`PixelInput`), so the first conv runs as ConvInteger on them; None keeps it a float conv."""
    return _export(model, tuple(input_shape), path, quantized=True, mode=mode, pixels=pixels)


def export_float_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> ExportReport:
    """The same graph with every quantizer off: the model's latent float weights, BatchNorm folded (FP32)."""
    return _export(model, tuple(input_shape), path, quantized=False)
