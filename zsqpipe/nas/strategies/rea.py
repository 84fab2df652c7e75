"""Regularized evolution (Real et al., AAAI 2019) as in NAS-Bench-201's R-EA baseline.

Population of ``population`` random cells; then, until the budget is spent: draw ``sample_size`` members
uniformly with replacement, mutate the best of them on one edge (:meth:`~zsqpipe.nas.spaces.nb201.NB201Cells.mutate`), evaluate the child,
append it and remove the oldest member (aging). NB201 settings: population 10, sample size 3
(``scripts-search/algos/R-EA.sh``: ``--ea_population 10 --ea_sample_size 3``). The result is the best cell
queried (by validation accuracy), as in NB201's ``R_EA.py``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from zsqpipe.config import PosInt
from zsqpipe.errors import ConfigError
from zsqpipe.nas.strategies.base import SearchContext, register_strategy


@dataclass(frozen=True)
class REAConfig:
    population: PosInt = 10
    sample_size: PosInt = 3


@register_strategy("rea", REAConfig)
def regularized_evolution(ctx: SearchContext, cfg: REAConfig) -> None:
    if cfg.population < 1 or cfg.sample_size < 1:
        raise ConfigError(
            f"nas.params.rea: population and sample_size must be >= 1, got {cfg.population}, {cfg.sample_size}"
        )
    population: deque = deque()
    while len(population) < cfg.population and ctx.remaining > 0:
        arch = ctx.space.sample(ctx.rng)
        population.append((arch, ctx.evaluate(arch)))
    while ctx.remaining > 0:
        picks = ctx.rng.integers(0, len(population), cfg.sample_size)
        parent = max((population[int(i)] for i in picks), key=lambda member: member[1])  # first on ties
        child = ctx.space.mutate(parent[0], ctx.rng)
        population.append((child, ctx.evaluate(child)))
        population.popleft()
