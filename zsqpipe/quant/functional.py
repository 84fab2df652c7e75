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
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    ste: str = "identity",
    inplace: bool = False,
):
    """Fake-quantize ``x`` with (broadcastable) ``scale`` and float ``zero_point`` on the grid [0, 2^bits - 1].

    Same values, cheaper (bit-identical, tests/test_quant.py): a per-tensor window on the CPU is clamped with
    Python-float bounds (a clamp with 0-d tensor bounds is ~4x slower); with ``inplace`` and under
    ``torch.inference_mode`` (evaluation), ``x`` itself is overwritten (no autograd record, no new tensor).
    """
    q_lo = -zero_point
    if q_lo.dim() == 0 and q_lo.device.type == "cpu":
        q_lo = float(q_lo)
    q_hi = q_lo + (2**bits - 1)
    if inplace and torch.is_inference_mode_enabled():
        return x.mul_(1.0 / scale).round_().clamp_(q_lo, q_hi).mul_(scale)
    return _FakeQuant.apply(x, scale, q_lo, q_hi, ste == "clipped")


def fake_quant_per_tensor(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int,
    ste: str = "identity",
    inplace: bool = False,
):
    """Asymmetric per-tensor fake quantization of ``x`` to ``bits`` over [lo, hi] (0-d or 1-element tensors);
    ``inplace``: see :func:`fake_quant`."""
    scale, zp = qparams(lo.reshape(()).float(), hi.reshape(()).float(), bits)
    return fake_quant(x, scale, zp, bits, ste, inplace)


def fake_quant_per_channel(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, axis: int = 0, ste: str = "identity"
):
    """Asymmetric per-channel fake quantization along ``axis`` (lo/hi: one value per channel)."""
    scale, zp = qparams(lo.float(), hi.float(), bits)
    shape = [1] * x.dim()
    shape[axis] = -1
    return fake_quant(x, scale.view(shape), zp.view(shape), bits, ste)


class _LSQ(torch.autograd.Function):
    """v = gamma * x / s, q = clamp(round(v), q_n, q_p); out = q * s / gamma (``post=None``) or q * post."""

    @staticmethod
    def forward(ctx, x, s, q_n: int, q_p: int, gamma: float, grad_scale: float, post):
        ctx.save_for_backward(x, s)
        ctx.args = (q_n, q_p, gamma, grad_scale, post)
        q = torch.mul(x, gamma / s).round_().clamp_(q_n, q_p)
        return q.mul_(s / gamma) if post is None else q.mul_(post)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        q_n, q_p, gamma, grad_scale, post = ctx.args
        v = torch.mul(x, gamma / s)
        inside = (v > q_n).logical_and_(v < q_p)
        # d out / dx: 1 inside the clipping range with post-scaling by s, post * gamma / s with a constant one
        grad_x = grad * inside if post is None else grad * inside * (post * gamma / s)
        grad_s = None
        if ctx.needs_input_grad[1]:
            if post is None:  # LSQ: d out / ds = (q - v) / gamma inside, q (= q_n or q_p) / gamma outside
                ds = torch.round(v).clamp_(q_n, q_p).sub_(v.mul_(inside))
                grad_s = ds.mul_(grad).sum_to_size(s.shape) * (grad_scale / gamma)
            else:  # constant post-scale: d out / ds = -post * v / s inside, 0 outside
                grad_s = v.mul_(inside).mul_(grad).sum_to_size(s.shape) * (-grad_scale * post / s)
        return grad_x, grad_s, None, None, None, None, None


def lsq_quantize(
    x: torch.Tensor,
    s: torch.Tensor,
    q_n: int,
    q_p: int,
    gamma: float = 1.0,
    grad_scale: float = 1.0,
    post: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """LSQ fake quantization (Esser et al., ICLR 2020, Eq. 1-3, gradient scale of Sec. 2.2) and the modified
    LSQ of transition-rate scheduling (Lee et al., ICCV 2025, Eq. 13).

    ``s`` (broadcastable to ``x``) is the learnable step; the integer grid is [q_n, q_p]. With ``post=None``
    (LSQ, gamma = 1) the output is ``s * clamp(round(x / s), q_n, q_p)``; with a constant ``post`` (no
    post-scaling by s, Eq. 13) it is ``post * clamp(round(gamma * x / s), q_n, q_p)``, ``post = 1 / gamma``
    being Eq. 13 exactly. Backward: straight-through round, zero gradient for x outside the clipping range
    (v <= q_n or v >= q_p, v = gamma * x / s), the exact gradient for s, multiplied by ``grad_scale``.
    """
    return _LSQ.apply(x, s, q_n, q_p, gamma, grad_scale, post)
