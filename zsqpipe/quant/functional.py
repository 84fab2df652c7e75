"""Fake quantization on an integer window, using PyTorch's fused fake-quant kernels.

GDFQ-family asymmetric quantization (``quantization_utils/quant_utils.py`` in GDFQ/HAST) of x with range
[lo, hi] and k bits: step s = (hi - lo) / (2^k - 1), a = round(lo / s), and

    x_hat = s * clamp(round(x / s), a, a + 2^k - 1).

This equals PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` with quant range [0, 2^k - 1] and zero
point z = -a (the tensor-qparams variants accept any z, so a range that excludes 0 is kept as GDFQ keeps it).
The forward is the fused kernel. The backward is chosen by ``ste``: ``identity`` passes the gradient unchanged
(GDFQ's straight-through estimator), ``clipped`` uses the kernel's own backward (zero outside the window).
"""

from __future__ import annotations

import torch

_EPS = 1e-8


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point (as float) for range [lo, hi] at ``bits``; lo/hi are broadcastable tensors."""
    n = 2**bits - 1
    scale = (hi - lo).clamp_min(_EPS) / n
    zero_point = -torch.round(lo / scale)
    return scale, zero_point


class _IdentitySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn, *args):
        ctx.n_args = len(args)
        return fn(x, *args)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None) + (None,) * ctx.n_args


def _per_tensor(x, scale, zero_point, qmax):
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, qmax)


def _per_channel(x, scale, zero_point, axis, qmax):
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, 0, qmax)


def fake_quant_per_tensor(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, ste: str = "identity"
):
    """Asymmetric per-tensor fake quantization of ``x`` to ``bits`` over [lo, hi] (0-d or 1-element tensors)."""
    scale, zp = qparams(lo.reshape(1).float(), hi.reshape(1).float(), bits)
    zp = zp.to(torch.int32)
    qmax = 2**bits - 1
    if ste == "identity":
        return _IdentitySTE.apply(x, _per_tensor, scale, zp, qmax)
    return _per_tensor(x, scale, zp, qmax)


def fake_quant_per_channel(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, axis: int = 0, ste: str = "identity"
):
    """Asymmetric per-channel fake quantization along ``axis`` (lo/hi: one value per channel)."""
    scale, zp = qparams(lo.float(), hi.float(), bits)
    qmax = 2**bits - 1
    if ste == "identity":
        return _IdentitySTE.apply(x, _per_channel, scale, zp, axis, qmax)
    return _per_channel(x, scale, zp, axis, qmax)
