"""REINFORCE (Williams, 1992) as in NAS-Bench-201's baseline (``exps/NAS-Bench-201-algos/reinforce.py``).

Policy: independent categoricals, one per edge, logits ``theta`` (6 x 5) initialised ``init_std * N(0, 1)``.
Each step samples a cell ``a ~ pi_theta``, queries its validation accuracy ``r`` (%), updates the baseline
``b`` (bias-corrected EMA with momentum ``ema_momentum``, updated *before* the loss as in NB201) and takes one
Adam step (``lr``) on ``-(r - b) * log pi_theta(a)``. The result is the best cell queried.
NB201 defaults: EMA momentum 0.9, Adam; learning rate 0.001 in the NB201 scripts (NATS-Bench later used 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zsqpipe.config import Momentum, NonNegFloat, PosFloat
from zsqpipe.nas.spaces.nb201 import NUM_EDGES, OPS
from zsqpipe.nas.strategies.base import SearchContext, register_strategy


@dataclass(frozen=True)
class ReinforceConfig:
    lr: PosFloat = 0.001
    ema_momentum: Momentum = 0.9
    init_std: NonNegFloat = 0.001


class DebiasedEMA:
    """NB201's ``ExponentialMovingAverage``: numerator/denominator, so the first value is not shrunk to 0."""

    def __init__(self, momentum: float):
        self.momentum, self.num, self.den = momentum, 0.0, 0.0

    def update(self, value: float) -> None:
        self.num = self.momentum * self.num + (1 - self.momentum) * value
        self.den = self.momentum * self.den + (1 - self.momentum)

    @property
    def value(self) -> float:
        return self.num / self.den


@register_strategy("reinforce", ReinforceConfig)
def reinforce(ctx: SearchContext, cfg: ReinforceConfig) -> None:
    gen = ctx.torch_gen
    theta = torch.nn.Parameter(cfg.init_std * torch.randn(NUM_EDGES, len(OPS), generator=gen))
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    baseline = DebiasedEMA(cfg.ema_momentum)
    while ctx.remaining > 0:
        probs = torch.softmax(theta, dim=-1)
        actions = torch.multinomial(probs.detach(), 1, generator=gen).view(-1)
        log_prob = torch.log(probs.gather(1, actions.view(-1, 1))).sum()
        reward = ctx.evaluate(tuple(OPS[int(a)] for a in actions))
        baseline.update(reward)
        loss = -log_prob * (reward - baseline.value)
        opt.zero_grad()
        loss.backward()
        opt.step()
