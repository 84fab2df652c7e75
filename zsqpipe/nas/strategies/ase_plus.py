"""ASE-NAS+ / DSM-NAS+: ASE-NAS whose initial subspace nodes are given architectures.

The paper's "+" results on CIFAR-100 and ImageNet16-120 start from the final graph of the CIFAR-10 search
(official ``--transfer``: ``search(args, graph.nodes, database, "cifar100")``); the initial nodes are
re-evaluated on the new dataset and count as queries. ``init_archs`` holds NB201 strings; the ``search``
stage prepends the nodes of a previous result file (``--init-from``, config ``nas.params.ase_plus.init_from``).
Fewer than K given: random cells fill the rest (as the official loop does). Every ASE setting applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from zsqpipe.config import Doc, Schema
from zsqpipe.nas.spaces.nb201 import str_to_arch
from zsqpipe.nas.strategies.ase import ASEConfig, ase_search
from zsqpipe.nas.strategies.base import SearchContext, register_strategy


@dataclass(frozen=True)
class ASEPlusConfig(ASEConfig):
    init_archs: Annotated[
        list[str], Schema(items={'type': 'string', 'pattern': '^\\|[a-z0-9_]+~0\\|\\+\\|[a-z0-9_]+~0\\|[a-z0-9_]+~1\\|\\+\\|[a-z0-9_]+~0\\|[a-z0-9_]+~1\\|[a-z0-9_]+~2\\|$', 'description': 'a NAS-Bench-201 cell string |op~0|+|op~0|op~1|+|op~0|op~1|op~2|'}), Doc("seed architectures for the initial nodes (random cells fill up to K)")
    ] = field(default_factory=list)


@register_strategy("ase_plus", ASEPlusConfig)
def ase_plus(ctx: SearchContext, cfg: ASEPlusConfig):
    return ase_search(ctx, cfg, [str_to_arch(s) for s in cfg.init_archs])
