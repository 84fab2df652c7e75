"""Transition-rate (TR) scheduling with a transition-adaptive learning rate (TALR) as an optimizer wrapper.

Lee, Jeon, Kim, Ham, "Scheduling Weight Transitions for Quantization-Aware Training" (ICCV 2025; arXiv
2404.19248 "Transition Rate Scheduling for QAT"); no official code is available. docs/methods/talr.md has the
equations, options and deviations. Per iteration t, for each TALR scope (a layer, or the whole model):

    k^t = (1/N) sum_i 1[w_d^t(i) != w_d^{t-1}(i)]          (Eq. 5, w_d: integer levels of the quantized weights)
    K^t = m K^{t-1} + (1 - m) k^t                           (Eq. 10)
    U^t = max(0, U^{t-1} + eta (R^t - K^t))                 (Eq. 11, R^t: scheduled target TR)
    w^{t+1} = w^t - U^t g^t                                 (Eq. 12, g^t: the wrapped optimizer's update)

Eq. 12 is realised by setting the learning rate of the latent weights' parameter group(s) to U before the
wrapped optimizer's step; every other parameter keeps its own (scheduled) learning rate.

``TALR.summary()`` records what a fair comparison needs (docs/methods/talr.md, controls): each scope's summed
learning rate sum_t U^t (the budget an LR-matched control gets) and the first step at which U^t falls
(R^t < K^t: the *regulating phase*, when the running transition rate has caught up with its target).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from zsqpipe.config import ConfigBase, Milestones, Momentum, OneOf, PosFloat
from zsqpipe.errors import ConfigError
from zsqpipe.quant.quantize import quant_layers

SCOPES = ("layer", "global")
SCHEDULES = ("cosine", "step", "constant")
LAYERS_KEY = "talr_layers"  # param-group key listing the layers whose latent weights the group holds


@dataclass(frozen=True)
class TALRConfig(ConfigBase):
    """scope: ``layer`` (one K and U per quantized layer, the paper's "TR scheduling in a single layer") or
    ``global`` (one K and U over all quantized weights). momentum: m of Eq. 10. eta: step of Eq. 11 (None = the
    initial TALR U^0, which is the wrapped optimizer's learning rate). target_rate: R^0 (None = tr_factor *
    sqrt(weight bits) per layer). schedule: decay of R^t from R^0 over the training steps (cosine to 0;
    ``step``: x ``decay`` at each fraction in ``milestones``; ``constant``). freeze_weight_scales: stop training
    the step sizes of weight quantizers (the paper does with TALR: otherwise weights change level without a
    latent update)."""

    prefix = "talr"  # how its errors name keys (ConfigBase.from_dict renames)

    scope: Annotated[str, OneOf(*SCOPES)] = "layer"
    momentum: Momentum = 0.99
    eta: PosFloat | None = None
    target_rate: PosFloat | None = None
    tr_factor: PosFloat = 5e-3
    schedule: Annotated[str, OneOf(*SCHEDULES)] = "cosine"
    milestones: Milestones = (0.5, 0.75)
    decay: PosFloat = 0.1
    freeze_weight_scales: bool = True

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ConfigError(f"talr.scope: expected one of {list(SCOPES)}, got {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"talr.schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"talr.momentum: expected a number in [0, 1), got {self.momentum!r}")
        for key in ("eta", "target_rate"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"talr.{key}: expected null or a positive number, got {v!r}")
        if not self.tr_factor > 0:
            raise ConfigError(f"talr.tr_factor: expected a positive number, got {self.tr_factor!r}")

    def target(self, r0: float, step: int, total_steps: int) -> float:
        """R^t for step t of ``total_steps``."""
        p = min(step / max(total_steps, 1), 1.0)
        if self.schedule == "cosine":
            return r0 * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.schedule == "step":
            return r0 * self.decay ** sum(p >= m for m in self.milestones)
        return r0


def _talr_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in quant_layers(model) if m.weight_quantizer.bits < 32]


def talr_param_groups(model: nn.Module, scope: str = "layer", **other: Any) -> list[dict[str, Any]]:
    """Parameter groups for the wrapped optimizer: the latent weights of the quantized layers (one group per
    layer for ``scope="layer"``, one group for ``"global"``), then every other parameter in a last group (with
    the options ``other``, e.g. its own ``lr`` or ``weight_decay``)."""
    layers = _talr_layers(model)
    if not layers:
        raise ConfigError("talr: the model has no quantized layer (call quantize_model first)")
    if scope == "layer":
        groups = [{"params": [m.weight], LAYERS_KEY: [n]} for n, m in layers]
    else:
        groups = [{"params": [m.weight for _, m in layers], LAYERS_KEY: [n for n, _ in layers]}]
    taken = {id(m.weight) for _, m in layers}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return groups + ([{"params": rest, **other}] if rest else [])


def group_layer(group: dict) -> str | None:
    """The layer whose latent weights a parameter group of :func:`talr_param_groups` holds alone (per-layer scope),
    else None (a global group of several layers, or the group of every other parameter)."""
    names = group.get(LAYERS_KEY)
    return names[0] if names and len(names) == 1 else None


def freeze_weight_scales(model: nn.Module) -> None:
    """Stop gradients to the learnable step sizes (``scale``) of the weight quantizers."""
    for _, m in quant_layers(model):
        scale = getattr(m.weight_quantizer, "scale", None)
        if isinstance(scale, nn.Parameter):
            scale.requires_grad_(False)


class TALR:
    """Wraps ``optimizer`` (built on :func:`talr_param_groups`) and replaces the learning rate of the latent
    weights by the transition-adaptive one. Call ``step()`` instead of ``optimizer.step()``; an LR scheduler
    on the wrapped optimizer may keep running: TALR groups get U back before every step.

    ``stats()`` gives k, K, R and U per scope (the last step) for logging.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        total_steps: int,
        cfg: TALRConfig | None = None,
    ):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg or TALRConfig(), int(total_steps)
        if not self.groups:
            raise ConfigError(
                f"talr: the optimizer has no parameter group with {LAYERS_KEY!r} (use talr_param_groups)"
            )
        self.layers = [[(n, model.get_submodule(n)) for n in g[LAYERS_KEY]] for g in self.groups]
        self.U = [float(g["lr"]) for g in self.groups]
        self.eta = [self.cfg.eta if self.cfg.eta is not None else u for u in self.U]
        self.K = [0.0] * len(self.groups)
        self.k = [0.0] * len(self.groups)
        self.R0 = [self._r0(layers) for layers in self.layers]
        self.R = list(self.R0)
        self.t = 0
        self.lr_sum = [0.0] * len(self.groups)  # sum over steps of the U each step applied
        self.regulating_step: list[int | None] = [None] * len(self.groups)  # first t with U^t < U^(t-1)
        self.regulating_target: list[float | None] = [None] * len(self.groups)  # R^t / R^0 at that step
        self.trace: dict[str, list[float]] = {"step": [], "U": [], "K": [], "R": []}  # scope means, sampled
        self._levels: list[list[torch.Tensor]] | None = None
        if self.cfg.freeze_weight_scales:
            freeze_weight_scales(model)

    @property
    def groups(self) -> list[dict]:
        """The TALR parameter groups, looked up each time (``optimizer.load_state_dict`` replaces the dicts)."""
        return [g for g in self.optimizer.param_groups if LAYERS_KEY in g]

    def _r0(self, layers: list[tuple[str, nn.Module]]) -> float:
        if self.cfg.target_rate is not None:
            return self.cfg.target_rate
        n = [m.weight.numel() for _, m in layers]
        r = [self.cfg.tr_factor * math.sqrt(m.weight_quantizer.bits) for _, m in layers]
        return sum(a * b for a, b in zip(n, r, strict=True)) / sum(n)

    @torch.no_grad()
    def _current_levels(self) -> list[list[torch.Tensor]]:
        return [[m.weight_quantizer.levels(m.weight) for _, m in layers] for layers in self.layers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if self._levels is None:
            self._levels = self._current_levels()
        for i, (g, u) in enumerate(zip(self.groups, self.U, strict=True)):
            g["lr"] = u
            self.lr_sum[i] += u
        loss = self.optimizer.step(closure)
        new = self._current_levels()
        counts = [
            torch.stack([(a != b).sum() for a, b in zip(old, cur, strict=True)]).sum()
            for old, cur in zip(self._levels, new, strict=True)
        ]
        changed = torch.stack(counts).tolist()  # one device sync per step
        self._levels = new
        self.t += 1
        c = self.cfg
        groups = self.groups
        for i, layers in enumerate(self.layers):
            self.k[i] = changed[i] / sum(m.weight.numel() for _, m in layers)
            self.K[i] = c.momentum * self.K[i] + (1 - c.momentum) * self.k[i]
            self.R[i] = c.target(self.R0[i], self.t, self.total_steps)
            if self.regulating_step[i] is None and self.R[i] < self.K[i] and self.U[i] > 0:
                self.regulating_step[i] = self.t
                self.regulating_target[i] = self.R[i] / self.R0[i]
            self.U[i] = max(0.0, self.U[i] + self.eta[i] * (self.R[i] - self.K[i]))
            groups[i]["lr"] = self.U[i]
        if self.t % max(1, -(-self.total_steps // 500)) == 0 or self.t == self.total_steps:  # <= 500 points
            self.trace["step"].append(self.t)
            for key, values in (("U", self.U), ("K", self.K), ("R", self.R)):
                self.trace[key].append(sum(values) / len(values))
        return loss

    def state_dict(self) -> dict[str, Any]:
        """k, K, R, U, the step count and the last integer levels (the wrapped optimizer saves its own)."""
        return {"k": list(self.k), "K": list(self.K), "R": list(self.R), "U": list(self.U), "t": self.t,
                "levels": self._levels, "lr_sum": list(self.lr_sum), "regulating_step": list(self.regulating_step),
                "regulating_target": list(self.regulating_target), "trace": {k: list(v) for k, v in self.trace.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["U"]) != len(self.groups):
            raise ValueError(
                f"TALR: state for {len(state['U'])} scopes, this optimizer has {len(self.groups)}"
            )
        self.k, self.K, self.R, self.U = (list(state[n]) for n in ("k", "K", "R", "U"))
        self.t, self._levels = int(state["t"]), state["levels"]
        self.lr_sum, self.regulating_step, self.regulating_target = (
            list(state[n]) for n in ("lr_sum", "regulating_step", "regulating_target")
        )
        self.trace = {k: list(v) for k, v in state["trace"].items()}

    def names(self) -> list[str]:
        """One name per scope: the layer's module name, or ``global``."""
        return [group_layer(g) or "global" for g in self.groups]

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            n: {"k": self.k[i], "K": self.K[i], "R": self.R[i], "U": self.U[i]}
            for i, n in enumerate(self.names())
        }

    def summary(self) -> dict[str, Any]:
        """What the run did with the LR: per scope the summed LR (sum_t U^t, what an LR-matched control is given)
        and the first regulating step (U falls: R^t < K^t; null = never) with R^t / R^0 there (near 0: only the
        decayed end of the target schedule was reached), their means / median / fraction over scopes, and the
        scope-mean U, K, R traced at <= 500 steps."""
        names, reached = self.names(), [s for s in self.regulating_step if s is not None]
        targets = [r for r in self.regulating_target if r is not None]
        return {
            "steps": self.t,
            "lr_sum": dict(zip(names, self.lr_sum, strict=True)),
            "lr_sum_mean": sum(self.lr_sum) / len(self.lr_sum),
            "regulating_step": dict(zip(names, self.regulating_step, strict=True)),
            "regulating_fraction": len(reached) / len(names),
            "regulating_step_median": statistics.median(reached) if reached else None,
            "regulating_target_median": statistics.median(targets) if targets else None,
            "trace": {k: list(v) for k, v in self.trace.items()},
        }
