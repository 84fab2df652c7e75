"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020): a 4-node cell, 6 edges, 5 candidate ops per edge.

An architecture is a tuple of 6 op names in the edge order ``EDGES`` (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2);
its standard string is ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``. ``arch_to_index`` is the base-5 enumeration
used by the shipped ground-truth table (``index = sum_e OPS.index(op_e) * 5**(5-e)``), not the official
NAS-Bench-201 API index.
"""

from __future__ import annotations

from zsqpipe.errors import ConfigError

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (to, from)
NUM_EDGES = len(EDGES)
NUM_ARCHS = len(OPS) ** NUM_EDGES  # 15,625

Arch = tuple[str, ...]


def validate_arch(ops: Arch) -> Arch:
    ops = tuple(ops)
    if len(ops) != NUM_EDGES or any(op not in OPS for op in ops):
        raise ConfigError(f"NAS-Bench-201 architecture {ops!r}: expected {NUM_EDGES} ops from {OPS}")
    return ops


def arch_to_str(ops: Arch) -> str:
    """Standard NB201 string, nodes separated by ``+``: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
    ops = validate_arch(ops)
    nodes = [
        "|" + "|".join(f"{ops[e]}~{src}" for e, (dst, src) in enumerate(EDGES) if dst == n) + "|"
        for n in (1, 2, 3)
    ]
    return "+".join(nodes)


def str_to_arch(s: str) -> Arch:
    """Inverse of :func:`arch_to_str`; a malformed string raises ``ConfigError`` naming it."""
    try:
        nodes = s.strip().split("+")
        ops: dict[tuple[int, int], str] = {}
        for n, node in enumerate(nodes, start=1):
            for tok in node.strip("|").split("|"):
                op, src = tok.split("~")
                ops[(n, int(src))] = op
        arch = tuple(ops[e] for e in EDGES)
        if len(ops) != NUM_EDGES:
            raise ValueError
    except (ValueError, KeyError):
        raise ConfigError(
            f"NAS-Bench-201 architecture string {s!r}: expected |op~0|+|op~0|op~1|+|op~0|op~1|op~2|"
        ) from None
    return validate_arch(arch)


def arch_to_index(ops: Arch) -> int:
    """Base-5 index: ``sum_e OPS.index(op_e) * 5**(5-e)`` (the shipped table's ``index`` column)."""
    ops = validate_arch(ops)
    return sum(OPS.index(op) * len(OPS) ** (NUM_EDGES - 1 - e) for e, op in enumerate(ops))


def index_to_arch(index: int) -> Arch:
    if not 0 <= int(index) < NUM_ARCHS:
        raise ConfigError(f"NAS-Bench-201 index {index}: expected 0..{NUM_ARCHS - 1}")
    digits = []
    for _ in range(NUM_EDGES):
        index, d = divmod(int(index), len(OPS))
        digits.append(OPS[d])
    return tuple(reversed(digits))


def is_connected(ops: Arch) -> bool:
    """True when the cell output (node 3) is reachable from its input (node 0) through edges that are not
    ``none``; a disconnected cell outputs zeros, so its network predicts from the classifier bias alone."""
    ops = validate_arch(ops)
    reach = {0}
    for e, (dst, src) in enumerate(EDGES):  # EDGES is ordered by destination node
        if ops[e] != "none" and src in reach:
            reach.add(dst)
    return 3 in reach


def uniform_crossover(a: Arch, b: Arch, rng) -> Arch:
    """Each edge's op from ``a`` or ``b`` with probability 1/2 (``rng.random()``: numpy or Python RNG)."""
    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True))


class NB201Cells:
    """The NB201 cell space for the tabular strategies (:class:`~zsqpipe.nas.spaces.SearchSpace`), with NB201's
    own moves on a numpy ``Generator``: uniform per-edge sampling and R-EA's one-edge mutation."""

    name = "nb201"

    def sample(self, rng) -> Arch:
        """A uniformly random cell (each edge's op drawn independently)."""
        return tuple(OPS[i] for i in rng.integers(0, len(OPS), NUM_EDGES))

    def mutate(self, arch: Arch, rng, p: float | None = None) -> Arch:
        """One-edge mutation (NB201's R-EA): a uniformly random edge gets a different, uniformly random op
        (``p`` is not used: R-EA mutates exactly one edge)."""
        ops = list(validate_arch(arch))
        edge = int(rng.integers(NUM_EDGES))
        others = [op for op in OPS if op != ops[edge]]
        ops[edge] = others[int(rng.integers(len(others)))]
        return tuple(ops)

    def crossover(self, a: Arch, b: Arch, rng) -> Arch:
        return uniform_crossover(a, b, rng)

    def to_str(self, arch: Arch) -> str:
        return arch_to_str(arch)
