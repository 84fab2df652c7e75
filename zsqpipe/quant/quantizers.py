"""Fake-quantizer modules, one class per algorithm (MQBench-style), registered by name.

A quantizer maps a float tensor to its fake-quantized value. Two phase switches (MQBench's
``enable_calibration``/``enable_quantization``) are shared by all quantizers:

- ``enabled``: apply fake quantization (otherwise identity);
- ``update_ranges``: update range statistics from the data seen (calibration).

Later algorithms subclass :class:`Quantizer` and register under a new name: ``lsq``, ``lsq_tensor``,
``lsq_nopost`` and ``lsq_nopost_fixed`` (learned step sizes, docs/methods/lsq.md) are at the end of this file.
Weight quantizers also give the integer level of every weight (``levels``), which transition-rate scheduling
counts (zsqpipe/quant/talr.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.quant.functional import (
    fake_quant_per_channel,
    fake_quant_per_tensor,
    lsq_quantize,
    qparams,
)
from zsqpipe.registry import Registry

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")


def register_quantizer(name: str) -> Callable[[type], type]:
    def deco(cls):
        cls.registry_name = name
        return QUANTIZERS.register(name)(cls)

    return deco


def create_quantizer(name: str, kind: str, bits: int, **kwargs) -> Quantizer:
    cls = QUANTIZERS.get(name, key=f"quant.{kind}_quantizer")
    if kind not in cls.kinds:
        raise ConfigError(
            f"quant.{kind}_quantizer: {name!r} cannot quantize {kind}s (it supports {cls.kinds})"
        )
    return cls(bits=bits, kind=kind, **kwargs)


class Quantizer(nn.Module):
    """Base class. ``bits`` is fixed at construction; ``bits >= 32`` means pass-through."""

    registry_name = "base"
    kinds: tuple[str, ...] = ()

    def __init__(self, bits: int, ste: str = "identity"):
        super().__init__()
        self.bits = int(bits)
        self.ste = ste
        self.enabled = True
        self.update_ranges = False
        # the input is a tensor only this quantizer reads (e.g. the output of the ReLU before it,
        # ``quantize_model``): under torch.inference_mode it may be fake-quantized in place
        self.inplace_input = False

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 32

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        """Integer level of every element of ``w`` (weight quantizers; used to count transitions)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose integer levels")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste}"


@register_quantizer("minmax_channel")
class MinMaxChannelQuantizer(Quantizer):
    """Asymmetric per-output-channel weight quantizer; range = min/max of the current weights, every forward
    (GDFQ ``Quant_Conv2d``/``Quant_Linear``)."""

    kinds = ("weight",)

    def __init__(self, bits: int, ste: str = "identity", **_):
        super().__init__(bits, ste)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        flat = w.detach().flatten(1)
        return fake_quant_per_channel(w, flat.min(1).values, flat.max(1).values, self.bits, 0, self.ste)

    @torch.no_grad()
    def levels(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.flatten(1)
        scale, zp = qparams(flat.min(1).values.float(), flat.max(1).values.float(), self.bits)
        shape = (-1,) + (1,) * (w.dim() - 1)
        q = torch.mul(w, 1.0 / scale.view(shape)).round_()
        return torch.maximum(torch.minimum(q, (2**self.bits - 1 - zp).view(shape)), -zp.view(shape)).int()


@register_quantizer("ema_minmax")
class EMAMinMaxQuantizer(Quantizer):
    """Asymmetric per-tensor activation quantizer with an exponential moving average of batch min/max.

    ``ema_mode="correct"``: r_1 = m_1, r_t = beta * r_{t-1} + (1 - beta) * m_t (EMA started at the first batch,
    as torch.ao's MovingAverageMinMaxObserver).
    ``ema_mode="official"``: the GDFQ/IntraQ/HAST ``QuantAct`` update, beta_t <- beta_t * beta,
    r_t = (beta * r_{t-1} + (1 - beta) * m_t) / (1 - beta_t) with r_0 = 0, which re-divides the stored value
    every step (ranges inflate for the first ~150 steps; see docs/quantization.md).
    Ranges only change while ``update_ranges`` is on ("frozen" otherwise).
    """

    kinds = ("act",)

    def __init__(
        self, bits: int, ste: str = "identity", momentum: float = 0.9, ema_mode: str = "correct", **_
    ):
        super().__init__(bits, ste)
        self.momentum = float(momentum)
        self.ema_mode = ema_mode
        self.register_buffer("x_min", torch.zeros(()))
        self.register_buffer("x_max", torch.zeros(()))
        self.register_buffer("beta_t", torch.ones(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._has_range = False  # python-side cache of num_updates > 0 (avoids a device sync per forward)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_range = bool(self.num_updates.item() > 0)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range this batch votes for (min and max; subclasses choose another rule)."""
        return torch.aminmax(x.detach())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self.batch_range(x)
        beta = self.momentum
        if self.ema_mode == "official":
            self.beta_t.mul_(beta)
            self.x_min.copy_((self.x_min * beta + lo * (1 - beta)) / (1 - self.beta_t))
            self.x_max.copy_((self.x_max * beta + hi * (1 - beta)) / (1 - self.beta_t))
        elif not self._has_range:
            self.x_min.copy_(lo)
            self.x_max.copy_(hi)
        else:
            self.x_min.lerp_(lo.to(self.x_min.dtype), 1 - beta)
            self.x_max.lerp_(hi.to(self.x_max.dtype), 1 - beta)
        self.num_updates += 1
        self._has_range = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.update_ranges:
            self.observe(x)
        if not self.active:
            return x
        if not self._has_range:
            raise RuntimeError("activation quantizer has no range yet: calibrate (update_ranges=True) first")
        return fake_quant_per_tensor(x, self.x_min, self.x_max, self.bits, self.ste, self.inplace_input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, ema_mode={self.ema_mode}"


@register_quantizer("ema_mse")
class EMAMSEQuantizer(EMAMinMaxQuantizer):
    """``ema_minmax`` whose per-batch range is the MSE-optimal clip instead of the batch min/max (MQBench's
    ``EMAMSEObserver`` rule; docs/quantization.md "Activation range rule"):

        c* = argmin_{c in {k/grid, k = 1..grid}} mean((Q_{[c lo, c hi]}(x) - x)^2),   batch range = (c* lo, c* hi)

    with x at most ``mse_samples`` elements of the batch taken at a fixed stride (deterministic, no random draw),
    (lo, hi) *their* min/max (MQBench shrinks the whole batch's) and Q the package's asymmetric fake quantizer at
    the quantizer's bits, all candidates at once; then the same EMA as ``ema_minmax``.
    """

    def __init__(self, bits: int, ste: str = "identity", grid: int = 100, mse_samples: int = 8192, **kwargs):
        super().__init__(bits, ste, **kwargs)
        self.grid = int(grid)
        self.mse_samples = int(mse_samples)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x = x.permute(0, 2, 3, 1)  # a view: reshaping it below copies nothing
        v = x.reshape(-1)
        v = v[:: max(1, -(-v.numel() // self.mse_samples))].float()
        lo, hi = torch.aminmax(v)
        c = torch.arange(1, self.grid + 1, device=v.device, dtype=v.dtype) / self.grid
        cand = v.expand(self.grid, -1)  # one row per candidate clip, quantized as per-channel rows
        err = (fake_quant_per_channel(cand, c * lo, c * hi, self.bits) - cand).pow_(2).mean(1)
        best = c[int(torch.argmin(err))]
        return (best * lo).to(x.dtype), (best * hi).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """LSQ, learned step size quantization (Esser et al., ICLR 2020, Eq. 1-3; docs/methods/lsq.md).

    x_hat = s * clamp(round(x / s), -Q_N, Q_P) with a learnable step s (``scale``): weights signed
    (Q_N = 2^(b-1), Q_P = 2^(b-1) - 1), one step per output channel (``per_channel=False``: one per tensor);
    activations (post-ReLU here) unsigned (Q_N = 0, Q_P = 2^b - 1), one step per tensor. The gradient of s is
    scaled by g = 1 / sqrt(N * Q_P), N = number of elements of the quantized tensor (weights of the layer,
    activations of the batch, as the OQAT code); x gets the clipped straight-through gradient (``ste`` is
    ignored). Init s = 2 * mean|x| / sqrt(Q_P) (per channel for per-channel weights): averaged over the batches
    seen while ``update_ranges`` is on (calibration), else from the first batch / the weights.
    """

    kinds = ("weight", "act")
    post_scaling = True  # LSQ multiplies by s after rounding; subclasses without it use a constant

    def __init__(
        self,
        bits: int,
        kind: str = "weight",
        per_channel: bool | None = None,
        signed: bool | None = None,
        ste: str = "identity",
        **_,
    ):
        super().__init__(bits, ste)
        self.kind = kind
        self.per_channel = kind == "weight" if per_channel is None else per_channel
        signed = kind == "weight" if signed is None else signed
        if self.per_channel and kind != "weight":
            raise ConfigError(f"{self.registry_name}: per-channel steps are for weights only")
        if signed and bits < 2:
            raise ConfigError(
                f"{self.registry_name}: signed (weight) quantization needs >= 2 bits, got {bits}"
            )
        b = min(self.bits, 31)
        self.q_n, self.q_p = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if signed else (0, 2**b - 1)
        self.gamma = 1.0
        self.scale = nn.Parameter(torch.ones(()))  # resized (per channel) and set when first initialised
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._n = 0  # python-side copy of num_updates (avoids a device sync per forward)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "post"):
            src, dst = state_dict.get(prefix + name), getattr(self, name, None)
            if src is not None and dst is not None and src.shape != dst.shape:
                dst.data = torch.empty_like(src, device=dst.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._n = int(self.num_updates.item())

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (x.dim() - 1) if self.per_channel else ()

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Initialise s = gamma * 2 * mean|x| / sqrt(Q_P), a running mean over the calls (calibration)."""
        a = x.detach().abs().float()
        m = a.flatten(1).mean(1) if self.per_channel else a.mean()
        init = (m * (2 * self.gamma / math.sqrt(self.q_p))).clamp_min(1e-8)
        if self._n == 0 or self.scale.shape != init.shape:
            self.scale.data = init
        else:
            self.scale.data.add_((init - self.scale.data) / (self._n + 1))
        self._n += 1
        self.num_updates.fill_(self._n)
        self._set_post()

    def _set_post(self) -> None:
        pass

    def _post(self, x: torch.Tensor) -> torch.Tensor | float | None:
        return None  # post-scaling by the learned step

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.clamp_min(1e-8).view(self._shape(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.update_ranges or (self.active and self._n == 0):
            self.observe(x)
        if not self.active:
            return x
        s = self._step(x).to(x.dtype)
        g = 1.0 / math.sqrt(x.numel() * self.q_p)
        return lsq_quantize(x, s, self.q_n, self.q_p, self.gamma, g, self._post(x))

    @torch.no_grad()
    def levels(self, w: torch.Tensor) -> torch.Tensor:
        s = self._step(w).to(w.dtype)
        return torch.mul(w, self.gamma / s).round_().clamp_(self.q_n, self.q_p).int()

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, kind={self.kind}, per_channel={self.per_channel}, "
            f"q=[{self.q_n}, {self.q_p}], gamma={self.gamma:g}"
        )


@register_quantizer("lsq_tensor")
class LSQTensorQuantizer(LSQQuantizer):
    """LSQ with one step per tensor for weights too (the LSQ paper's and OQAT's choice)."""

    def __init__(self, bits: int, kind: str = "weight", **kwargs):
        kwargs.setdefault("per_channel", False)
        super().__init__(bits, kind, **kwargs)


@register_quantizer("lsq_nopost")
class LSQNoPostQuantizer(LSQQuantizer):
    """Modified LSQ of transition-rate scheduling (Lee et al., ICCV 2025, Eq. 13), no post-scaling by s:

    x_q = (1 / gamma) * round(clip(gamma * x / s, alpha, beta)), (alpha, beta, gamma) = (-2^(b-1), 2^(b-1) - 1,
    2^(b-1)) for weights and (0, 2^b - 1, 2^b) for activations; one learnable s per quantizer. The output is a
    fixed-point number in [-1, 1) or [0, 1) whatever the input scale, so it relies on a normalisation layer
    after the quantized layer (BatchNorm in training mode). x gets gradient 1/s inside the range; s gets
    -x / s^2 inside and 0 outside, scaled by the LSQ factor g (an assumption: the paper only says "following
    LSQ"). Init s = gamma * 2 * mean|x| / sqrt(Q_P), the range of LSQ's initial step (an assumption).
    """

    post_scaling = False

    def __init__(self, bits: int, kind: str = "weight", **kwargs):
        kwargs.setdefault("per_channel", False)
        super().__init__(bits, kind, **kwargs)
        self.gamma = float(-self.q_n if self.q_n < 0 else self.q_p + 1)

    def _post(self, x: torch.Tensor) -> torch.Tensor | float | None:
        return 1.0 / self.gamma


@register_quantizer("lsq_nopost_fixed")
class LSQFixedPostQuantizer(LSQNoPostQuantizer):
    """Eq. 13 followed by a *fixed* de-normalisation h (the paper's Eq. 3 allows "omitted (or fixed)"):
    x_q = delta * round(clip(gamma * x / s, alpha, beta)) with the constant delta = s_init / gamma (a buffer set
    at initialisation), so the output starts at LSQ's scale. The gradients are those of Eq. 13 times
    delta * gamma; use it where the quantizer output does not feed a normalisation layer (residual shortcuts
    after a quantized ReLU, classifiers) or where BatchNorm runs in eval mode.
    """

    def __init__(self, bits: int, kind: str = "weight", **kwargs):
        super().__init__(bits, kind, **kwargs)
        self.register_buffer("post", torch.ones(()))

    def _set_post(self) -> None:
        self.post = (self.scale.detach() / self.gamma).clone()

    def _post(self, x: torch.Tensor) -> torch.Tensor | float | None:
        return self.post.view(self._shape(x)).to(x.dtype)
