"""Weight-sharing supernet of the OFA / MobileNetV3 space (:mod:`zsqpipe.nas.spaces.ofa`).

Once-for-All (Cai et al., ICLR 2020) elastic layers, written from the paper and the ``mit-han-lab/once-for-all``
layer definitions:

- **elastic kernel** (:class:`DynamicConv2d`): the depthwise kernel of size k < k_max is the centre k x k of
  the k_max kernel; with ``kernel_transform`` it is then multiplied by a learned k^2 x k^2 matrix per layer and
  size step (7 -> 5, 5 -> 3, applied in turn; identity at init), OFA's kernel transformation (Sec. 3.2);
- **elastic expand**: the first ``make_divisible(C_in x e)`` channels of the expansion, depthwise and
  projection weights and of their BN (:class:`DynamicBatchNorm2d`) run (OFA slices the leading channels; its
  progressive-shrinking channel sorting is not done here: every subnet is trained from the start);
- **elastic depth**: the first ``d`` blocks of every unit run.

MobileNetV3's activations and squeeze-and-excitation (per unit, ``OFASpaceConfig.activations`` / ``se``):
h-swish (``nn.Hardswish``) and :class:`DynamicSE` (OFA's ``DynamicSE``: global pool, 1x1 reduce to
``make_divisible(C / 4)`` with bias, ReLU, 1x1 expand with bias, h-sigmoid, times the input; its convs slice the
active channels and stay full precision, as in OQAT). The activation before an SE module has no quantizer of
its own: the SE output, which the projection conv reads, is quantized instead (:meth:`OFASupernet.attach_input_quantizers`).

:class:`DynamicConv2d` is a :class:`~zsqpipe.quant.QuantConv2d`: ``quantize_model`` attaches a weight
quantizer to it (instead of replacing it) that quantizes the *sliced* weight, so every subnet shares one
weight step per layer (OQAT). ``count_bitops`` asks it for the MACs of the active slice.
:meth:`OFASupernet.get_active_subnet` returns a stand-alone full-precision network with the active
weights copied (``nn.Conv2d``/``nn.BatchNorm2d`` only), whose outputs equal the supernet's.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.nas.spaces.ofa import OFAArch, OFASpaceConfig, make_divisible
from zsqpipe.quant.modules import QuantConv2d
from zsqpipe.quant.quantizers import Quantizer

__all__ = ["DynamicBatchNorm2d", "DynamicConv2d", "OFASupernet", "build_ofa_supernet"]


class PassThrough(Quantizer):
    """The weight 'quantizer' of a dynamic conv that is not quantized (32 bits: identity)."""

    kinds = ("weight",)

    def __init__(self):
        super().__init__(32)

    def forward(self, x):
        return x


class DynamicConv2d(QuantConv2d):
    """A conv holding the largest weight (C_out_max, C_in_max / groups, k_max, k_max) that runs a slice of it:
    ``active_out`` output channels, ``active_in`` input channels (pointwise) and an ``active_kernel`` kernel
    (depthwise: groups = channels = ``active_out``). Padding is k // 2 (same size for stride 1)."""

    def __init__(
        self,
        in_max: int,
        out_max: int,
        kernel_max: int = 1,
        stride: int = 1,
        depthwise: bool = False,
        ks_list: tuple[int, ...] = (),
        kernel_transform: bool = False,
    ):
        groups = out_max if depthwise else 1
        if depthwise and in_max != out_max:
            raise ValueError("DynamicConv2d: a depthwise conv has as many inputs as outputs")
        nn.Conv2d.__init__(
            self, in_max, out_max, kernel_max, stride, kernel_max // 2, groups=groups, bias=False
        )
        self.depthwise = depthwise
        self.weight_quantizer = PassThrough()
        self.active_in, self.active_out, self.active_kernel = in_max, out_max, kernel_max
        self.ks_list = tuple(sorted(set(ks_list) | {kernel_max}))
        self.kernel_transform = kernel_transform and len(self.ks_list) > 1
        if self.kernel_transform:  # OFA: one matrix per size step, named "<big>to<small>"
            self.transforms = nn.ParameterDict(
                {
                    f"{b}to{s}": nn.Parameter(torch.eye(s * s))
                    for b, s in zip(self.ks_list[:0:-1], self.ks_list[-2::-1], strict=True)
                }
            )

    def attach_weight_quantizer(self, quantizer: Quantizer) -> None:
        self.weight_quantizer = quantizer

    def active_weight(self) -> torch.Tensor:
        """The slice that runs, after OFA's kernel transformation (centre crop, then the learned matrix)."""
        w = (
            self.weight[: self.active_out]
            if self.depthwise
            else self.weight[: self.active_out, : self.active_in]
        )
        k_big = self.kernel_size[0]
        for k in reversed(self.ks_list):  # 7 -> 5 -> 3: each step crops the previous (transformed) kernel
            if k >= k_big or k < self.active_kernel:
                continue
            start = (w.shape[-1] - k) // 2
            w = w[..., start : start + k, start : start + k]
            if self.kernel_transform:
                m = self.transforms[f"{_prev(self.ks_list, k)}to{k}"]
                w = F.linear(w.reshape(-1, k * k), m).reshape(w.shape)
        return w

    def forward(self, x):
        w = self.weight_quantizer(self.active_weight())
        groups = self.active_out if self.depthwise else 1
        return F.conv2d(x, w, None, self.stride, self.active_kernel // 2, 1, groups)

    def active_macs(self, out: torch.Tensor) -> int:
        per_out = (1 if self.depthwise else self.active_in) * self.active_kernel**2
        return int(out.numel() // out.shape[0] * per_out)


def _prev(ks_list: tuple[int, ...], k: int) -> int:
    """The next larger kernel size of ``ks_list`` above ``k`` (the source of the k transform)."""
    return ks_list[ks_list.index(k) + 1]


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first ``x.shape[1]`` channels of its parameters and running statistics (OFA's
    ``DynamicBatchNorm2d``); with all channels it is ``nn.BatchNorm2d``. The running-statistics update of a
    slice writes through to the buffers (momentum None = cumulative average, as in BN recalibration)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean[:c] if track and self.running_mean is not None else None,
            self.running_var[:c] if track and self.running_var is not None else None,
            self.weight[:c] if self.weight is not None else None,
            self.bias[:c] if self.bias is not None else None,
            use_batch,
            factor,
            self.eps,
        )


def activation(kind: str) -> nn.Module:
    """``relu`` -> ``nn.ReLU`` (``quantize_model`` puts an unsigned quantizer after it), ``h_swish`` ->
    ``nn.Hardswish`` (x * ReLU6(x + 3) / 6, MobileNetV3; OQAT puts a signed quantizer after it)."""
    return nn.ReLU() if kind == "relu" else nn.Hardswish()


class PreSEActivation(nn.Module):
    """The activation in front of an SE module: the same function, but no quantizer follows it (the SE
    output is quantized instead, where the projection conv reads it)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return F.relu(x) if self.kind == "relu" else F.hardswish(x)

    def extra_repr(self) -> str:
        return self.kind


class DynamicSEConv(nn.Conv2d):
    """A 1x1 conv with bias that runs its first ``active_out`` x ``active_in`` weights (the SE's two convs:
    full precision, so ``quantize_model`` leaves it alone; ``count_bitops`` counts its active MACs)."""

    def __init__(self, in_max: int, out_max: int):
        super().__init__(in_max, out_max, 1, bias=True)
        self.active_in, self.active_out = in_max, out_max

    def forward(self, x):
        return F.conv2d(x, self.weight[: self.active_out, : self.active_in], self.bias[: self.active_out])

    def active_macs(self, out: torch.Tensor) -> int:
        return int(out.numel() // out.shape[0] * self.active_in)


class DynamicSE(nn.Module):
    """Squeeze-and-excitation over the first C channels of its input (OFA's ``DynamicSE``, reduction 4):
    y = h_sigmoid(W_e ReLU(W_r pool(x) + b_r) + b_e), output x * y; W_r is (make_divisible(C / 4), C)."""

    reduction = 4

    def __init__(self, channels_max: int):
        super().__init__()
        mid = make_divisible(channels_max // self.reduction)
        self.reduce, self.expand = DynamicSEConv(channels_max, mid), DynamicSEConv(mid, channels_max)
        self.out_quant: nn.Module = nn.Identity()  # OQAT: the quantizer of the projection conv's input

    def forward(self, x):
        c = x.shape[1]
        self.reduce.active_in = self.expand.active_out = c
        self.reduce.active_out = self.expand.active_in = make_divisible(c // self.reduction)
        y = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))
        return self.out_quant(x * F.hardsigmoid(self.expand(y)))


class DynamicMBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> BN -> act -> k x k depthwise (stride) -> BN -> act [-> SE] ->
    1x1 project -> BN, plus the identity when ``residual``; act is ReLU or h-swish. Elastic kernel and expand
    ratio."""

    def __init__(self, cin: int, cout: int, stride: int, space: OFASpaceConfig, residual: bool,
                 act: str = "relu", se: bool = False):  # fmt: skip
        super().__init__()
        self.cin, self.cout, self.stride, self.residual = cin, cout, stride, residual
        self.act, self.use_se = act, se
        mid = make_divisible(cin * max(space.expand_list))
        kmax = max(space.ks_list)
        self.expand = nn.Sequential(DynamicConv2d(cin, mid), DynamicBatchNorm2d(mid), activation(act))
        self.depthwise = nn.Sequential(
            DynamicConv2d(mid, mid, kmax, stride, True, space.ks_list, space.kernel_transform),
            DynamicBatchNorm2d(mid),
            PreSEActivation(act) if se else activation(act),
            *([DynamicSE(mid)] if se else []),
        )
        self.project = nn.Sequential(DynamicConv2d(mid, cout), DynamicBatchNorm2d(cout))
        self.input_quant: nn.Module = (
            nn.Identity()
        )  # OQAT: a signed activation quantizer (block inputs are BN outputs)
        self.ks, self.e = kmax, max(space.expand_list)

    def set_active(self, ks: int, e: int) -> None:
        mid = make_divisible(self.cin * e)
        self.ks, self.e = ks, e
        self.expand[0].active_out = mid
        dw = self.depthwise[0]
        dw.active_in = dw.active_out = mid
        dw.active_kernel = ks
        self.project[0].active_in = mid

    def forward(self, x):
        h = self.project(self.depthwise(self.expand(self.input_quant(x))))
        return h + x if self.residual else h


def _static_conv(conv: DynamicConv2d) -> nn.Conv2d:
    w = conv.active_weight().detach()
    out = nn.Conv2d(
        w.shape[1] * (conv.active_out if conv.depthwise else 1),
        w.shape[0],
        w.shape[-1],
        conv.stride,
        w.shape[-1] // 2,
        groups=conv.active_out if conv.depthwise else 1,
        bias=False,
    )
    out.weight.data.copy_(w)
    return out


def _static_bn(bn: nn.BatchNorm2d, c: int) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(c, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        out.weight.data.copy_(bn.weight.data[:c])
        out.bias.data.copy_(bn.bias.data[:c])
    if bn.track_running_stats:
        out.running_mean.copy_(bn.running_mean[:c])
        out.running_var.copy_(bn.running_var[:c])
        out.num_batches_tracked.copy_(bn.num_batches_tracked)
    return out


class StaticSE(nn.Module):
    """:class:`DynamicSE` at one width, with plain ``nn.Conv2d`` layers."""

    def __init__(self, se: DynamicSE, channels: int):
        super().__init__()
        mid = make_divisible(channels // se.reduction)
        self.reduce, self.expand = nn.Conv2d(channels, mid, 1), nn.Conv2d(mid, channels, 1)
        for static, dynamic in ((self.reduce, se.reduce), (self.expand, se.expand)):
            o, i = static.weight.shape[:2]
            static.weight.data.copy_(dynamic.weight.data[:o, :i])
            static.bias.data.copy_(dynamic.bias.data[:o])

    def forward(self, x):
        y = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))
        return x * F.hardsigmoid(self.expand(y))


class StaticMBConv(nn.Module):
    def __init__(self, block: DynamicMBConv):
        super().__init__()
        mid = block.expand[0].active_out
        self.residual = block.residual
        self.expand = nn.Sequential(
            _static_conv(block.expand[0]), _static_bn(block.expand[1], mid), activation(block.act)
        )
        self.depthwise = nn.Sequential(
            _static_conv(block.depthwise[0]),
            _static_bn(block.depthwise[1], mid),
            activation(block.act),
            *([StaticSE(block.depthwise[3], mid)] if block.use_se else []),
        )
        self.project = nn.Sequential(_static_conv(block.project[0]), _static_bn(block.project[1], block.cout))

    def forward(self, x):
        h = self.project(self.depthwise(self.expand(x)))
        return h + x if self.residual else h


class OFASupernet(nn.Module):
    """OFA MobileNetV3-style supernet: stem (3x3 conv, BN, ReLU), a fixed MBConv (k3, e1, residual), the
    elastic units, a 1x1 final expansion (``final_expand`` x the last width, BN, ReLU), global average pool and
    the classifier. ``forward`` runs the subnet set by :meth:`set_active_subnet` (the largest at start)."""

    def __init__(self, space: OFASpaceConfig, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.space, self.in_channels, self.num_classes = space, in_channels, num_classes
        stem = space.channels(space.stem_width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, space.stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem),
            activation(space.stem_activation),
        )
        self.first_block = nn.Sequential(
            nn.Conv2d(stem, stem, 3, 1, 1, groups=stem, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(),
            nn.Conv2d(stem, stem, 1, bias=False),
            nn.BatchNorm2d(stem),
        )
        blocks: list[DynamicMBConv] = []
        cin = stem
        for width, stride, act, se in zip(space.widths, space.strides, space.activations, space.se, strict=True):
            cout = space.channels(width)
            for j in range(space.max_depth):
                blocks.append(DynamicMBConv(cin, cout, stride if j == 0 else 1, space, j > 0, act, se))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        final = cin * space.final_expand
        self.head_quant: nn.Module = (
            nn.Identity()
        )  # input quantizer of the final expansion (see attach_input_quantizers)
        self.final_expand = nn.Sequential(
            nn.Conv2d(cin, final, 1, bias=False), nn.BatchNorm2d(final), activation(space.final_activation)
        )
        self.classifier = nn.Linear(final, num_classes)
        self.arch: OFAArch = space.largest
        self.set_active_subnet(self.arch)

    def set_active_subnet(self, arch: OFAArch | str) -> OFASupernet:
        """Select the subnet (OFA dict, or its canonical string) that ``forward`` runs."""
        arch = self.space.from_str(arch) if isinstance(arch, str) else self.space.validate(arch)
        for b, block in enumerate(self.blocks):
            block.set_active(arch["ks"][b], arch["e"][b])
        self.arch = arch
        self._runs = [b for unit in self.space.active_blocks(arch) for b in unit]
        return self

    def sample_active_subnet(self, rng: random.Random) -> OFAArch:
        arch = self.space.sample(rng)
        self.set_active_subnet(arch)
        return arch

    def attach_input_quantizers(self, make: Callable[[], nn.Module], make_act: Callable[[bool], nn.Module]) -> None:
        """Quantize every conv input that ``quantize_model`` (a quantizer after each ``nn.ReLU``) leaves in
        full precision. ``make()`` (an activation quantizer) goes on the input of every elastic block and of
        the final expansion: linear-bottleneck BN outputs or residual sums (signed), which no ReLU precedes
        (the residual path itself stays unquantized). ``make_act(signed)`` goes after every h-swish (signed:
        its output reaches -3/8) but the final expansion's (it feeds only the full-precision classifier,
        like the head ReLU OQAT leaves unquantized) and on every SE output (signed in h-swish blocks), the
        projection conv's input."""
        for block in self.blocks:
            block.input_quant = make()
            if block.use_se:
                block.depthwise[3].out_quant = make_act(block.act == "h_swish")
        self.head_quant = make()
        for parent in [m for m in self.modules() if m is not self.final_expand]:
            for key, child in list(parent.named_children()):
                if type(child) is nn.Hardswish:
                    setattr(parent, key, nn.Sequential(child, make_act(True)))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_expand(self.head_quant(h))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.first_block(h)
        for b in self._runs:
            h = self.blocks[b](h)
        return self._head(h)

    def get_active_subnet(self) -> nn.Module:
        """A stand-alone FP copy of the active subnet (``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear``): the
        kernel transformation is folded into its weights; its output equals the supernet's. Only for a
        full-precision supernet: the copy of a quantized (OQAT) one would drop its quantizers, so it raises
        (quantize the extracted FP subnet with ``quantize_model`` instead)."""
        quantized = [n for n, m in self.named_modules() if isinstance(m, Quantizer) and m.bits < 32]
        if quantized:
            raise ValueError(
                f"OFASupernet.get_active_subnet: the supernet is quantized ({quantized[0]}, ...); "
                "extract from a full-precision supernet"
            )
        return StaticOFANet(self)


class _FirstBlock(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class StaticOFANet(nn.Sequential):
    """The network :meth:`OFASupernet.get_active_subnet` extracts (a plain ``nn.Sequential``)."""

    def __init__(self, supernet: OFASupernet):
        super().__init__(
            copy.deepcopy(supernet.stem),
            _FirstBlock(copy.deepcopy(supernet.first_block)),
            *[StaticMBConv(supernet.blocks[b]) for b in supernet._runs],
            copy.deepcopy(supernet.final_expand),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            copy.deepcopy(supernet.classifier),
        )
        self.arch = copy.deepcopy(supernet.arch)


def build_ofa_supernet(space: OFASpaceConfig, in_channels: int, num_classes: int) -> OFASupernet:
    return OFASupernet(space, in_channels, num_classes)
