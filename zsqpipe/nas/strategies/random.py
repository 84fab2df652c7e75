"""Random search: ``budget`` uniformly random cells (with replacement, as NB201's ``random_wo_share``);
the result is the best by validation accuracy."""

from __future__ import annotations

from dataclasses import dataclass

from zsqpipe.nas.strategies.base import SearchContext, register_strategy


@dataclass(frozen=True)
class RandomConfig:
    """No settings."""


@register_strategy("random", RandomConfig)
def random_search(ctx: SearchContext, cfg: RandomConfig) -> None:
    while ctx.remaining > 0:
        ctx.evaluate(ctx.space.sample(ctx.rng))
