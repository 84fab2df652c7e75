"""BitOPs-constrained evolutionary search on validation accuracy, and the Pareto front."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from zsqpipe.nas.oqat.config import OQATSearchConfig
from zsqpipe.nas.oqat.supernet import NB201Space, OFAMBV3Space
from zsqpipe.nas.spaces.nb201 import Arch

# ----------------------------------------------------------------------------------------------------------
# Search


def constrained_search(
    evaluate: Callable[[Arch], float],
    cost: Callable[[Arch], float],
    budget: float,
    cfg: OQATSearchConfig,
    seed: int = 0,
    cache: dict[Arch, float] | None = None,
    max_tries: int = 500,
    space: NB201Space | OFAMBV3Space | None = None,
) -> dict[str, Any]:
    """Evolutionary search for the cell with the best ``evaluate`` score (validation top-1) among cells with
    ``cost`` (BitOPs) <= ``budget`` (SPOS / OQAT: evolution under a FLOPs constraint; OQAT's ``profile_quant``
    cost is BitOPs-based). Population of ``cfg.population`` random feasible cells, then ``cfg.generations``
    rounds of ``cfg.children`` new feasible cells (half mutation, half crossover of the best ``cfg.parents``).
    ``evaluate`` results are memoised in ``cache``; cells already in it that fit the budget join the candidates
    for free, so with a shared cache and increasing budgets the found accuracy never drops as the budget
    grows. Ties are broken by lower cost.
    Returns ``{arch, val_acc, cost, evaluated: [arch, ...]}``; ``arch`` is None when no feasible cell is found."""
    rng = random.Random(seed)
    space = space or NB201Space()
    cache = {} if cache is None else cache
    seen: list[Arch] = []

    def score(a: Arch) -> float:
        if a not in cache:
            cache[a] = float(evaluate(a))
        return cache[a]

    def add(a: Arch) -> bool:
        if a in seen or cost(a) > budget:
            return False
        seen.append(a)
        score(a)
        return True

    for a in list(cache):  # cells already scored (smaller budgets) are free candidates
        if cost(a) <= budget:
            seen.append(a)
    tries, new = 0, 0
    while new < cfg.population and tries < max_tries:
        tries += 1
        new += add(space.sample(rng))
    for _ in range(cfg.generations):
        if not seen:
            break
        parents = sorted(seen, key=lambda a: (-cache[a], cost(a)))[: cfg.parents]
        made, tries = 0, 0
        while made < cfg.children and tries < max_tries:
            tries += 1
            if made % 2 == 0 or len(parents) < 2:
                child = space.mutate(rng.choice(parents), rng, cfg.mutation_prob)
            else:
                a, b = rng.sample(parents, 2)
                child = space.crossover(a, b, rng)
            made += add(child)
    if not seen:
        return {"arch": None, "val_acc": None, "cost": None, "evaluated": []}
    best = min(seen, key=lambda a: (-cache[a], cost(a), seen.index(a)))
    return {"arch": best, "val_acc": cache[best], "cost": cost(best), "evaluated": list(seen)}


def pareto_front(points: Iterable[tuple[Any, float, float]]) -> list[tuple[Any, float, float]]:
    """Non-dominated ``(key, cost, score)`` points (lower cost, higher score), sorted by cost."""
    best: list[tuple[Any, float, float]] = []
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if not best or p[2] > best[-1][2]:
            best.append(p)
    return best
