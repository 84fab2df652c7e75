"""Search strategies over a tabular benchmark, each a plug-in ``zsqpipe/nas/strategies/<name>.py``.

``random`` (uniform sampling), ``rea`` (regularized evolution), ``reinforce`` (per-edge categorical policy),
``ase`` (ASE-NAS / DSM-NAS: GNN + LSTM controller over a dynamic graph of K subspaces) and ``ase_plus``
(ASE-NAS+, ``ase`` seeded with given architectures). Interface and registry: :mod:`.base`; methods and
sources: ``docs/methods/nas_search.md``.
"""

from zsqpipe.nas.strategies.base import (
    STRATEGY_NAMES,
    BudgetExhausted,
    Query,
    QueryLog,
    SearchContext,
    SearchResult,
    get_strategy,
    mutate_arch,
    random_arch,
    register_strategy,
    run_strategy,
)

__all__ = [
    "STRATEGY_NAMES",
    "BudgetExhausted",
    "Query",
    "QueryLog",
    "SearchContext",
    "SearchResult",
    "get_strategy",
    "mutate_arch",
    "random_arch",
    "register_strategy",
    "run_strategy",
]
