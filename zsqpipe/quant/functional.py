"""Fake quantization on an integer window (GDFQ's asymmetric quantizer), with a choice of STE.

GDFQ-family asymmetric quantization (``quantization_utils/quant_utils.py`` in GDFQ/HAST) of x with range
[lo, hi] and k bits: step s = (hi - lo) / (2^k - 1), a = round(lo / s), and

    x_hat = s * clamp(round(x / s), a, a + 2^k - 1).

This equals PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` with quant range [0, 2^k - 1] and zero
point z = -a (checked bit-exactly in tests/test_quant.py), but a range that excludes 0 is kept as GDFQ keeps it.
The forward is written as three in-place elementwise ops because PyTorch's fused CPU kernel, which also
builds its gradient mask, is ~2x slower on a 2-core CPU (benchmarks/bench_fake_quant.py). The backward is chosen by
``ste``: ``identity`` passes the gradient unchanged (GDFQ's straight-through estimator), ``clipped`` zeroes it
where round(x / s) falls outside the window (PyTorch's fake-quant backward).
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point (as float, PyTorch's convention) for range [lo, hi] at ``bits``."""
    n = 2**bits - 1
    scale = (hi - lo).clamp_min(_EPS) / n
    zero_point = -torch.round(lo / scale)
    return scale, zero_point


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, q_lo, q_hi, clipped: bool):
        q = torch.mul(x, 1.0 / scale).round_()  # PyTorch's kernels multiply by 1/scale too
        if clipped:
            ctx.save_for_backward((q >= q_lo) & (q <= q_hi))
        ctx.clipped = clipped
        return q.clamp_(q_lo, q_hi).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clipped:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, ste: str = "identity"
):
    """Fake-quantize ``x`` with (broadcastable) ``scale`` and float ``zero_point`` on the grid [0, 2^bits - 1]."""
    q_lo = -zero_point
    return _FakeQuant.apply(x, scale, q_lo, q_lo + (2**bits - 1), ste == "clipped")


def fake_quant_per_tensor(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, ste: str = "identity"
):
    """Asymmetric per-tensor fake quantization of ``x`` to ``bits`` over [lo, hi] (0-d or 1-element tensors)."""
    scale, zp = qparams(lo.reshape(()).float(), hi.reshape(()).float(), bits)
    return fake_quant(x, scale, zp, bits, ste)


def fake_quant_per_channel(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, axis: int = 0, ste: str = "identity"
):
    """Asymmetric per-channel fake quantization along ``axis`` (lo/hi: one value per channel)."""
    scale, zp = qparams(lo.float(), hi.float(), bits)
    shape = [1] * x.dim()
    shape[axis] = -1
    return fake_quant(x, scale.view(shape), zp.view(shape), bits, ste)
