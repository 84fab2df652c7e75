"""Low-bit quantization of output-activation gradients with an adaptive clipping interval (LBT).

Kim et al., "Toward INT4 Fixed-Point Training via Exploring Quantization Error for Gradients" (ECCV 2024;
official code ``cvlab-yonsei/LBT``: ``models/modules.py: grad_quant``, ``train.py: update_interval``).
docs/methods/lbt.md has the equations, options and deviations.

Backward of each selected Conv2d/Linear output y, with G = dL/dy, b bits and clipping ratio gamma:

    c = gamma * max|G|,  Delta = 2c / (2^b - 2),  G_hat = Delta * clamp(floor((G + c) / Delta + u), 0, 2^b - 2) - c

u ~ U[0, 1): stochastic rounding on 2^b - 1 symmetric levels (the official code adds U(-1/2, 1/2) and rounds,
the same distribution). After each iteration ``update_intervals`` moves gamma toward the optimal clipping
condition R(G, gamma*) = alpha / (2^b - 1), R = fraction of |G| > gamma * max|G| (the official update):

    gamma <- clip(gamma + step * sign(R - alpha / (2^b - 1)), gamma_min, 1),   step = 1 - 0.999.

``interval="minmax"`` keeps gamma = 1 (no clipping), ``"fixed"`` keeps gamma = ``gamma`` (the paper's
gamma = 0.8 / 0.6 baselines); ``bits`` None or 32 leaves gradients in full precision.

Self-contained (torch and zsqpipe.errors only), so plain FP training can use it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from zsqpipe.config import ConfigBase, OneOf, Range, Schema
from zsqpipe.errors import ConfigError

INTERVAL_MODES = ("adaptive", "minmax", "fixed")
_TINY = 1e-20  # keeps the interval > 0 when a gradient is all zeros (then G_hat = 0)


@dataclass(frozen=True)
class GradQuantConfig(ConfigBase):
    """bits: gradient bits (None or 32 = FP gradients). interval: ``adaptive`` (LBT), ``minmax`` (gamma = 1)
    or ``fixed`` (gamma constant). alpha: LBT's ``max_ratio_constant`` (target clip-out ratio times 2^b - 1).
    step: gamma change per iteration (official 1 - 0.999). gamma: initial (``adaptive`` without ``search_init``)
    or constant (``fixed``) ratio. search_init: the official first-batch search for gamma. gamma_min: lower
    clamp of gamma (official 0.001)."""

    prefix = "grad_quant"  # how its errors name keys (ConfigBase.from_dict renames)

    bits: Annotated[
        int | None, Schema(anyOf=[{'type': 'integer', 'minimum': 2, 'maximum': 16}, {'const': 32}, {'type': 'null'}])
    ] = None
    interval: Annotated[str, OneOf(*INTERVAL_MODES)] = "adaptive"
    alpha: Annotated[float, Range(gt=0, le=1)] = 1e-3
    step: Annotated[float, Range(gt=0, le=1)] = 1e-3
    gamma: Annotated[float, Range(gt=0, le=1)] = 1.0
    search_init: bool = True
    gamma_min: Annotated[float, Range(gt=0, le=1)] = 1e-3

    def __post_init__(self):
        b = self.bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not (2 <= b <= 16 or b == 32)):
            raise ConfigError(f"grad_quant.bits: expected null, 32 or an integer in 2..16, got {b!r}")
        if self.interval not in INTERVAL_MODES:
            raise ConfigError(
                f"grad_quant.interval: expected one of {list(INTERVAL_MODES)}, got {self.interval!r}"
            )
        for key in ("alpha", "step", "gamma", "gamma_min"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
                raise ConfigError(f"grad_quant.{key}: expected a number in (0, 1], got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.bits is not None and self.bits < 32

    @property
    def target_ratio(self) -> float:
        """alpha / (2^b - 1): the clip-out ratio of the optimal interval."""
        return self.alpha / (2 ** (self.bits or 32) - 1)


def quantize_grad(g: torch.Tensor, bits: int, clip: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of ``g`` onto 2^bits - 1 symmetric levels over [-clip, clip] (values outside clip).

    Unbiased inside the interval: E[G_hat] = G for |G| <= clip.
    """
    n = 2**bits - 2
    c = clip.clamp_min(_TINY)
    delta = 2 * c / n
    q = (g + c).div_(delta).add_(torch.rand_like(g)).floor_().clamp_(0, n)
    return q.mul_(delta).sub_(c)


class _LayerState:
    """Per-layer clipping ratio and the statistics of the last backward pass through the layer."""

    def __init__(self, gamma: float):
        self.gamma = gamma  # python float: read in backward without a device sync
        self.ratio: torch.Tensor | None = None  # R = mean(|G| > gamma * max|G|) of the last backward
        self.nonzero: torch.Tensor | None = None  # max|G| > 0
        self.abs_grad: torch.Tensor | None = None  # |G| of the first backward, for the init search
        self.initialized = False


class GradQuantHandle:
    """Hooks installed by :func:`enable_grad_quant`. Call ``update_intervals()`` once per iteration, after the
    backward pass (LBT: after the optimizer step); ``remove()`` uninstalls the hooks."""

    def __init__(self, cfg: GradQuantConfig):
        self.cfg = cfg
        self.enabled = True
        self.layers: dict[str, _LayerState] = {}
        self._hooks: list[Any] = []

    def _attach(self, name: str, module: nn.Module) -> None:
        gamma = 1.0 if self.cfg.interval == "minmax" else float(self.cfg.gamma)
        st = self.layers[name] = _LayerState(gamma)

        def hook(_m, _inp, out):
            # a tensor hook replaces the gradient flowing into the layer (also with an in-place op after it)
            if self.enabled and out.requires_grad:
                out.register_hook(lambda g: self._quantize(st, g))

        self._hooks.append(module.register_forward_hook(hook))

    def _quantize(self, st: _LayerState, g: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return g
        a = g.abs()
        g_max = a.amax()
        clip = g_max * st.gamma
        if self.cfg.interval == "adaptive":
            st.ratio = torch.count_nonzero(a > clip) / a.numel()
            st.nonzero = g_max > 0
            if not st.initialized and self.cfg.search_init:
                st.abs_grad = a.flatten()
        return quantize_grad(g, self.cfg.bits, clip)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def update_intervals(self) -> None:
        """LBT ``update_interval``: gamma += step * sign(R - alpha / (2^b - 1)), clamped to [gamma_min, 1], for
        every layer that had a non-zero gradient; the first call runs the official initial search instead."""
        if not self.cfg.enabled or self.cfg.interval != "adaptive":
            return
        target, c = self.cfg.target_ratio, self.cfg
        ready = [st for st in self.layers.values() if st.ratio is not None]
        for st in [st for st in ready if not st.initialized and c.search_init]:
            if bool(st.nonzero):
                st.gamma = search_initial_gamma(st.abs_grad, target, c.step, c.gamma, c.gamma_min)
                st.initialized = True
            st.abs_grad = st.ratio = None
        ready = [st for st in ready if st.ratio is not None]
        if ready:  # one device sync for all layers
            stats = torch.stack([torch.stack([st.ratio, st.nonzero.float()]) for st in ready]).tolist()
            for st, (ratio, nonzero) in zip(ready, stats, strict=True):
                if nonzero:
                    sign = (ratio > target) - (ratio < target)
                    st.gamma = min(max(st.gamma + c.step * sign, c.gamma_min), 1.0)
                    st.initialized = True
                st.ratio = None

    def state_dict(self) -> dict[str, Any]:
        """Per layer: the clipping ratio gamma and whether it was initialised (the rest lives within a step)."""
        return {n: {"gamma": st.gamma, "initialized": st.initialized} for n, st in self.layers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.layers):
            raise ValueError(f"grad_quant: state for layers {sorted(state)}, hooks on {sorted(self.layers)}")
        for n, s in state.items():
            self.layers[n].gamma, self.layers[n].initialized = float(s["gamma"]), bool(s["initialized"])

    def gammas(self) -> dict[str, float]:
        return {n: st.gamma for n, st in self.layers.items()}


def search_initial_gamma(
    abs_grad: torch.Tensor, target: float, step: float = 1e-3, gamma0: float = 1.0, gamma_min: float = 1e-3
) -> float:
    """The official first-batch init: starting at gamma0, decrease gamma by ``step`` while an EMA (momentum
    1 - step) of the clip-out ratio R(gamma) stays <= ``target``; then one step back up, clamped to
    [gamma_min, 1]. R is read from the sorted |G| (one pass) instead of one pass per candidate."""
    a = abs_grad.flatten().float().sort().values
    n, g_max = a.numel(), a[-1]
    k_max = int(math.ceil((gamma0 + 1.0) / step)) + 2  # down to gamma = -1 (where R = 1): always stops before
    gam = gamma0 - step * torch.arange(k_max, dtype=torch.float64, device=a.device)
    thr = (gam * g_max.double()).float()
    ratios = ((n - torch.searchsorted(a, thr, right=True)) / n).tolist()
    ema, k, m = 0.0, 0, 1.0 - step
    while True:
        ema = m * ema + step * ratios[min(k, k_max - 1)]
        if ema > target:
            return min(max(gamma0 - step * (k - 1), gamma_min), 1.0)
        if ema < target:
            k += 1


def enable_grad_quant(
    model: nn.Module, cfg: GradQuantConfig, layers: Iterable[str] | None = None
) -> GradQuantHandle:
    """Quantize the output gradient of Conv2d/Linear layers of ``model`` (see the module docstring).

    ``layers``: module names; default: every layer with an active weight quantizer (``weight_quantizer`` with
    bits < 32, as ``quantize_model`` makes), or every Conv2d/Linear if the model has no quantized layer (FP
    training). With ``cfg.bits`` None/32 no hook is installed and ``update_intervals`` does nothing.
    Install after any ``copy.deepcopy`` of the model (hooks hold the handle).
    """
    handle = GradQuantHandle(cfg)
    if not cfg.enabled:
        return handle
    mods = dict(model.named_modules())
    if layers is None:
        cands = [(n, m) for n, m in mods.items() if isinstance(m, nn.Conv2d | nn.Linear)]
        quantized = [
            (n, m)
            for n, m in cands
            if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.bits < 32
        ]
        if not any(hasattr(m, "weight_quantizer") for _, m in cands):
            quantized = cands
        selected = quantized
    else:
        names = list(layers)
        missing = [n for n in names if not isinstance(mods.get(n), nn.Conv2d | nn.Linear)]
        if missing:
            raise ConfigError(f"grad_quant.layers: no Conv2d/Linear module named {missing[0]!r}")
        selected = [(n, mods[n]) for n in names]
    for name, m in selected:
        handle._attach(name, m)
    return handle
