"""The strategy interface: a strategy gets a budgeted evaluator (arch -> validation accuracy) and seeded
generators, spends at most ``budget`` queries, and the framework records every query.

A strategy is a function ``fn(ctx: SearchContext, cfg) -> None | (best_arch, extras)`` registered with
``@register_strategy(name, Config)`` in ``zsqpipe/nas/strategies/<name>.py``; ``cfg`` is its ``Config``
dataclass built from the config's ``nas.params.<name>``. It returns ``None`` (the result is the best queried
architecture by validation accuracy, first one on ties) or its own output (ASE: the best graph node) plus
extras for the result file. :func:`get_strategy` imports the one module it needs, so each strategy's code
version covers only its own module.

The evaluator is the only window on the benchmark: it returns validation accuracy and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zsqpipe.config import from_dict
from zsqpipe.errors import ConfigError
from zsqpipe.nas.spaces.nb201 import Arch, NB201Cells, validate_arch
from zsqpipe.registry import Registry

STRATEGY_NAMES: tuple[str, ...] = ("random", "rea", "reinforce", "ase", "ase_plus")


class BudgetExhausted(RuntimeError):
    """A strategy asked for more queries than its budget (a bug in the strategy, never a user error)."""


@dataclass(frozen=True)
class Query:
    query: int  # 1-based position in the search
    arch: Arch
    valid_acc: float


class QueryLog:
    """Budgeted evaluator: counts queries, refuses the one past the budget, records the history.

    Every call is one query, also for an architecture queried before (as the official NB201/ASE-NAS loops
    count them: each evaluation costs simulated training time).
    """

    def __init__(self, evaluate: Callable[[Arch], float], budget: int):
        self._evaluate = evaluate
        self.budget = int(budget)
        self.history: list[Query] = []

    def __call__(self, arch: Arch) -> float:
        if len(self.history) >= self.budget:
            raise BudgetExhausted(f"query {len(self.history) + 1} exceeds the budget of {self.budget}")
        arch = validate_arch(arch)
        acc = float(self._evaluate(arch))
        self.history.append(Query(len(self.history) + 1, arch, acc))
        return acc

    @property
    def used(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.history)


@dataclass
class SearchContext:
    """What a strategy gets: the budgeted evaluator and generators seeded from one seed."""

    evaluate: QueryLog
    seed: int
    rng: np.random.Generator
    log: Callable[[str], None] = print
    _torch_gen: Any = field(default=None, repr=False)
    space: NB201Cells = field(default_factory=NB201Cells)  # the moves random search and R-EA make

    @property
    def budget(self) -> int:
        return self.evaluate.budget

    @property
    def remaining(self) -> int:
        return self.evaluate.remaining

    @property
    def torch_gen(self):
        """A ``torch.Generator`` seeded with the search seed (created on first use: numpy-only strategies
        never import torch)."""
        if self._torch_gen is None:
            import torch

            self._torch_gen = torch.Generator().manual_seed(int(self.seed))
        return self._torch_gen


@dataclass
class SearchResult:
    strategy: str
    history: list[Query]
    best_arch: Arch
    best_valid: float
    extras: dict[str, Any] = field(default_factory=dict)

    def best_so_far(self) -> list[float]:
        """Best validation accuracy after each query."""
        return np.maximum.accumulate([q.valid_acc for q in self.history]).tolist()


@dataclass(frozen=True)
class StrategySpec:
    name: str
    fn: Callable
    config: type


STRATEGIES: Registry[StrategySpec] = Registry("strategy", key="nas.strategies", declared=STRATEGY_NAMES,
                                              module="zsqpipe.nas.strategies.{}")  # fmt: skip


def register_strategy(name: str, config: type):
    """Register a search function ``fn(evaluate, budget, seed, cfg, log)`` with its config dataclass."""
    return STRATEGIES.register(name, wrap=lambda key, fn: StrategySpec(key, fn, config))


def get_strategy(name: str) -> StrategySpec:
    return STRATEGIES.get(name)


def run_strategy(
    name: str,
    evaluate: Callable[[Arch], float],
    budget: int,
    seed: int,
    params: dict | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run strategy ``name`` with ``params`` (its ``nas.params.<name>`` settings) for ``budget`` queries."""
    spec = get_strategy(name)
    cfg = from_dict(spec.config, params, f"nas.params.{name}")
    if int(budget) < 1:
        raise ConfigError(f"nas.budget: expected a positive number of queries, got {budget}")
    queries = QueryLog(evaluate, budget)
    ctx = SearchContext(queries, int(seed), np.random.default_rng(int(seed)), log)
    out = spec.fn(ctx, cfg)
    if not queries.history:
        raise ConfigError(f"nas strategy {name!r} made no query (budget {budget})")
    best_arch, extras = out if out is not None else (None, {})
    if best_arch is None:
        best = max(queries.history, key=lambda q: q.valid_acc)  # first one on ties
        best_arch = best.arch
    best_valid = next(q.valid_acc for q in queries.history if q.arch == tuple(best_arch))
    return SearchResult(name, list(queries.history), tuple(best_arch), best_valid, dict(extras or {}))


# ---------------------------------------------------------------------------------------------------------
# NB201 moves shared by the strategies


def random_arch(rng: np.random.Generator) -> Arch:
    """A uniformly random cell (:meth:`NB201Cells.sample`)."""
    return NB201Cells().sample(rng)


def mutate_arch(arch: Arch, rng: np.random.Generator) -> Arch:
    """NB201's one-edge R-EA mutation (:meth:`NB201Cells.mutate`)."""
    return NB201Cells().mutate(arch, rng)
