"""Fake-quantizer modules, one class per algorithm (MQBench-style), registered by name.

A quantizer maps a float tensor to its fake-quantized value. Two phase switches (MQBench's
``enable_calibration``/``enable_quantization``) are shared by all quantizers:

- ``enabled``: apply fake quantization (otherwise identity);
- ``update_ranges``: update range statistics from the data seen (calibration).

Later algorithms (LSQ, ...) subclass :class:`Quantizer` and register under a new name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from zsqpipe.errors import ConfigError
from zsqpipe.quant.functional import fake_quant_per_channel, fake_quant_per_tensor

QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type], type]:
    def deco(cls):
        if name in QUANTIZERS:
            raise ValueError(f"quantizer {name!r} is registered twice")
        QUANTIZERS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def create_quantizer(name: str, kind: str, bits: int, **kwargs) -> Quantizer:
    if name not in QUANTIZERS:
        raise ConfigError(
            f"quant.{kind}_quantizer: unknown quantizer {name!r}; expected one of {sorted(QUANTIZERS)}"
        )
    cls = QUANTIZERS[name]
    if kind not in cls.kinds:
        raise ConfigError(
            f"quant.{kind}_quantizer: {name!r} cannot quantize {kind}s (it supports {cls.kinds})"
        )
    return cls(bits=bits, **kwargs)


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

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 32

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

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
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
        return fake_quant_per_tensor(x, self.x_min, self.x_max, self.bits, self.ste)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, ema_mode={self.ema_mode}"
