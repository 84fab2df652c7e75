"""Search spaces. ``nb201``: the NAS-Bench-201 cell space (5 ops x 6 edges, 15,625 cells); ``ofa``: the
OFA / MobileNetV3 space (plain-dict architectures).

:class:`SearchSpace` is the interface the search code programs against: the tabular strategies
(``zsqpipe.nas.strategies``, through ``SearchContext.space``: :class:`~zsqpipe.nas.spaces.nb201.NB201Cells`)
and OQAT's evolutionary search (``zsqpipe.nas.oqat.supernet``: ``NB201Space``, ``OFAMBV3Space``). Each space
draws from the RNG type of the official code it follows (NB201's R-EA: a numpy ``Generator``; SPOS/OQAT:
Python's ``random.Random``), so the same protocol keeps every published sampling stream.
"""

from __future__ import annotations

from typing import Any, Protocol


class SearchSpace(Protocol):
    name: str

    def sample(self, rng: Any) -> Any:
        """A uniformly random architecture."""

    def mutate(self, arch: Any, rng: Any, p: float | None = None) -> Any:
        """A neighbour of ``arch`` (``p``: per-gene mutation probability where the space uses one)."""

    def crossover(self, a: Any, b: Any, rng: Any) -> Any:
        """A child taking each gene from ``a`` or ``b``."""

    def to_str(self, arch: Any) -> str:
        """The architecture in the space's published string format."""
