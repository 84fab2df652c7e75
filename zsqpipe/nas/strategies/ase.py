"""ASE-NAS / DSM-NAS on NAS-Bench-201 (Chen et al., arXiv 2210.17180; IEEE TCSVT 2024), re-implemented from
the description of the official BSD-3 code (``chenyaofo/DSM-NAS``: ``entry/train201.py``,
``codebase/controller/{nasbench201,gnn,base}.py``, ``codebase/core/dynamic_graph.py``); no code copied.

- **Dynamic graph.** K subspaces, each a node holding a centre cell and its validation accuracy. Node feature
  (37-d): one-hot op of each of the 6 edges over 6 slots (the official ``eye(6)`` for 5 ops) + accuracy (%).
  For each pair one directed edge worse -> better (``acc_i <= acc_j``: i -> j); edge feature
  ``x_j - x_i``.
- **Controller.** A 2-layer EdgeGraphSAGE (Handling Missing Data with Graph Representation Learning, You et
  al. 2020; directed variant) after linear maps of node/edge features to ``hidden``; an ``LSTMCell(hidden)``.
  Global step: input = mean node embedding, logits ``v^T tanh(W_e H + W_h h)``, squashed ``1.5 tanh``, sample
  node k. Local steps (``n_steps``): sample an edge (6-way), then an op (5-way), logits ``0.6 tanh``
  (= 1.5 / 2.5); each choice's embedding feeds the next LSTM step. All parameters ~ U(-0.1, 0.1).
- **Step.** a' = a_k with the sampled (edge, op) edits; query a'; gain g = acc(a') - acc(a_k)
  (``absolute_reward``: g = acc(a')); baseline b <- EMA_0.9(g) (first value taken as is); reward r = g - b;
  loss ``-r log p - entropy_coeff * H``; one Adam step. Node k is replaced by a' if acc(a') > acc(a_k).
- **Output.** The node with the highest validation accuracy.

``inplace_mutation``: the official ``NASBench201Architecture.apply()`` edits the op list of the start node in
place and returns an object sharing that list. The start node's ops therefore become a' even when a' is
worse, while its accuracy, its features (cached tensor) and its reported metadata stay those of a_k; the
next edit from that node starts from a' (a random walk whose position is not its recorded best). Default
``false``: edits start from a copy (the centre stays a_k, as the paper describes). ``true`` reproduces the
official behaviour: each node keeps a *cursor* (where edits start) apart from its evaluated centre.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.config import Doc, Momentum, NonNegFloat, PosFloat, PosInt, Range
from zsqpipe.errors import ConfigError
from zsqpipe.nas.spaces.nb201 import NUM_EDGES, OPS, Arch, arch_to_str
from zsqpipe.nas.strategies.base import SearchContext, register_strategy

ONEHOT_SLOTS = 6  # official: torch.eye(6) for the 5 NB201 ops (the 6th slot is always 0)
NODE_FEATURES = NUM_EDGES * ONEHOT_SLOTS + 1  # + validation accuracy (%) = 37


@dataclass(frozen=True)
class ASEConfig:
    K: Annotated[int, Range(ge=2), Doc("subspace nodes in the dynamic graph")] = 3
    n_steps: Annotated[PosInt, Doc("(edge, op) edits per step")] = 4
    hidden: PosInt = 64
    gnn_layers: PosInt = 2
    lr: PosFloat = 0.009446763714621489
    weight_decay: NonNegFloat = 2.3740059139364297e-05
    entropy_coeff: NonNegFloat = 0.0005049559768158195
    baseline_decay: Momentum = 0.9
    tanh_constant: PosFloat = 1.5
    op_tanh_reduce: PosFloat = 2.5
    init_range: PosFloat = 0.1
    absolute_reward: Annotated[bool, Doc("official --use_absolute_perf")] = False
    # true = the official in-place edit of the start node (see module doc)
    inplace_mutation: Annotated[
        bool, Doc("true = the official in-place edit of the start node (a bug; docs/methods/nas_search.md)")
    ] = False


# ---------------------------------------------------------------------------------------------------------
# Graph


def node_features(archs: list[Arch], accs: list[float]) -> torch.Tensor:
    x = torch.zeros(len(archs), NODE_FEATURES)
    for n, arch in enumerate(archs):
        for e, op in enumerate(arch):
            x[n, e * ONEHOT_SLOTS + OPS.index(op)] = 1.0
        x[n, -1] = float(accs[n])
    return x


def graph_edges(accs: list[float]) -> list[tuple[int, int]]:
    """One directed edge per unordered pair, from the worse to the better node (ties: lower index first)."""
    edges: list[tuple[int, int]] = []
    for i, j in itertools.product(range(len(accs)), repeat=2):
        if i != j and accs[i] <= accs[j] and (j, i) not in edges:
            edges.append((i, j))
    return edges


class EdgeSAGELayer(nn.Module):
    """One directed EdgeGraphSAGE layer (node and edge embeddings in, node and edge embeddings out).

    For node i and every other node j: message m_ij = relu(pool(relu([h_i, e_ij, e_ji] P))) where e_ij / e_ji
    is the embedding of the edge i->j / j->i or 0 when absent; node update h_i' = relu([h_i, mean_j m_ij] Q);
    edge update e_uv' = relu([e_uv, h_u', h_v'] W).
    """

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        if out != hidden:
            raise ValueError("EdgeSAGELayer: out must equal hidden (edge update concatenates node outputs)")
        self.P = nn.Parameter(torch.empty(3 * dim, hidden))
        self.Q = nn.Parameter(torch.empty(dim + hidden, out))
        self.W = nn.Parameter(torch.empty(dim + 2 * hidden, out))
        self.pool = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor, edges: list[tuple[int, int]]):
        n = h.shape[0]
        slot = {uv: k for k, uv in enumerate(edges)}
        e0 = torch.cat([e.new_zeros(1, e.shape[1]), e])  # row 0 = "no edge"
        rows_i, rows_out, rows_in = [], [], []
        for i in range(n):
            for j in range(n):
                if i != j:
                    rows_i.append(i)
                    rows_out.append(slot.get((i, j), -1) + 1)
                    rows_in.append(slot.get((j, i), -1) + 1)
        msg_in = torch.cat([h[rows_i], e0[rows_out], e0[rows_in]], dim=1)
        msg = F.relu(self.pool(F.relu(msg_in @ self.P)))
        agg = msg.view(n, n - 1, -1).mean(dim=1)
        h_new = F.relu(torch.cat([h, agg], dim=1) @ self.Q)
        src = torch.tensor([u for u, _ in edges], dtype=torch.long)
        dst = torch.tensor([v for _, v in edges], dtype=torch.long)
        e_new = F.relu(torch.cat([e, h_new[src], h_new[dst]], dim=1) @ self.W)
        return h_new, e_new


class EdgeGraphSAGE(nn.Module):
    def __init__(self, layers: int, in_features: int, hidden: int):
        super().__init__()
        self.node_in = nn.Linear(in_features, hidden)
        self.edge_in = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(EdgeSAGELayer(hidden, hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor, ex: torch.Tensor, edges: list[tuple[int, int]]) -> torch.Tensor:
        h, e = self.node_in(x), self.edge_in(ex)
        for layer in self.layers:
            h, e = layer(h, e, edges)
        return h


# ---------------------------------------------------------------------------------------------------------
# Controller


@dataclass
class Decision:
    node: int
    edits: list[tuple[int, int]]  # (edge index, op index)
    log_prob: torch.Tensor
    entropy: torch.Tensor


class ASEController(nn.Module):
    def __init__(self, cfg: ASEConfig):
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.gnn = EdgeGraphSAGE(cfg.gnn_layers, NODE_FEATURES, h)
        self.lstm = nn.LSTMCell(h, h)
        self.attn_node = nn.Linear(h, h, bias=False)
        self.attn_hidden = nn.Linear(h, h, bias=False)
        self.attn_v = nn.Linear(h, 1, bias=False)
        self.node_embedding = nn.Embedding(cfg.K, h)
        self.edge_embedding = nn.Embedding(NUM_EDGES, h)
        self.op_embedding = nn.Embedding(len(OPS), h)
        self.edge_decision = nn.Linear(h, NUM_EDGES)
        self.op_decision = nn.Linear(h, len(OPS))

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-self.cfg.init_range, self.cfg.init_range, generator=gen)

    def _sample(self, logits: torch.Tensor, gen: torch.Generator):
        probs = F.softmax(logits, dim=-1)
        action = int(torch.multinomial(probs.detach(), 1, generator=gen))
        log_p = torch.log(probs[action])
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
        return action, log_p, entropy

    def forward(self, x, ex, edges, gen: torch.Generator) -> Decision:
        cfg = self.cfg
        local_c = cfg.tanh_constant / cfg.op_tanh_reduce
        H = self.gnn(x, ex, edges)
        state = self.lstm(H.mean(dim=0, keepdim=True))
        logits = self.attn_v(torch.tanh(self.attn_node(H) + self.attn_hidden(state[0]))).view(-1)
        node, log_p, ent = self._sample(cfg.tanh_constant * torch.tanh(logits), gen)
        log_ps, ents = [log_p], [ent]
        embed = self.node_embedding(torch.tensor([node]))
        edits = []
        for _ in range(cfg.n_steps):
            state = self.lstm(embed, state)
            edge, log_p, ent = self._sample(local_c * torch.tanh(self.edge_decision(state[0]).view(-1)), gen)
            log_ps.append(log_p)
            ents.append(ent)
            state = self.lstm(self.edge_embedding(torch.tensor([edge])), state)
            op, log_p, ent = self._sample(local_c * torch.tanh(self.op_decision(state[0]).view(-1)), gen)
            log_ps.append(log_p)
            ents.append(ent)
            embed = self.op_embedding(torch.tensor([op]))
            edits.append((edge, op))
        return Decision(node, edits, torch.stack(log_ps).sum(), torch.stack(ents).sum())


# ---------------------------------------------------------------------------------------------------------
# Search


@dataclass
class Node:
    arch: Arch  # the evaluated centre (features, accuracy, output)
    acc: float
    cursor: Arch  # where edits start: == arch, except with inplace_mutation (official bug)


def apply_edits(arch: Arch, edits: list[tuple[int, int]]) -> Arch:
    ops = list(arch)  # a copy: the official code edits the start node's own list (see inplace_mutation)
    for edge, op in edits:
        ops[edge] = OPS[op]
    return tuple(ops)


class EMA:
    """The official ``MovingAverageMetric``: first value taken as is, then ``b <- decay b + (1 - decay) x``."""

    def __init__(self, decay: float):
        self.decay, self.value, self.n = decay, 0.0, 0

    def update(self, x: float) -> None:
        self.value = x if self.n == 0 else self.decay * self.value + (1 - self.decay) * x
        self.n += 1


def ase_search(ctx: SearchContext, cfg: ASEConfig, init_archs: list[Arch] | tuple = ()):
    """The ASE-NAS loop; ``init_archs`` (ASE-NAS+) seed the first nodes, random cells fill the rest."""
    if cfg.K < 2:
        raise ConfigError(f"nas.params.ase.K: need at least 2 subspace nodes, got {cfg.K}")
    if ctx.budget < cfg.K:
        raise ConfigError(f"nas.budget: {ctx.budget} queries cannot evaluate the K={cfg.K} initial nodes")
    if len(init_archs) > cfg.K:
        raise ConfigError(
            f"nas.params.ase_plus.init_archs: {len(init_archs)} architectures for K={cfg.K} nodes"
        )
    gen = ctx.torch_gen
    archs = [tuple(a) for a in init_archs] + [ctx.space.sample(ctx.rng) for _ in range(cfg.K - len(init_archs))]
    nodes = [Node(a, ctx.evaluate(a), a) for a in archs]

    controller = ASEController(cfg)
    controller.reset_parameters(gen)
    opt = torch.optim.Adam(controller.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    baseline = EMA(cfg.baseline_decay)
    replaced = 0
    while ctx.remaining > 0:
        accs = [n.acc for n in nodes]
        edges = graph_edges(accs)
        x = node_features([n.arch for n in nodes], accs)
        src, dst = zip(*edges, strict=True)
        ex = x[list(dst)] - x[list(src)]
        d = controller(x, ex, edges, gen)
        start = nodes[d.node]
        child = apply_edits(start.cursor if cfg.inplace_mutation else start.arch, d.edits)
        acc = ctx.evaluate(child)
        if acc > start.acc:
            nodes[d.node] = Node(child, acc, child)
            replaced += 1
        elif cfg.inplace_mutation:
            start.cursor = child
        gain = acc if cfg.absolute_reward else acc - start.acc
        baseline.update(gain)
        loss = -d.log_prob * (gain - baseline.value) - cfg.entropy_coeff * d.entropy
        opt.zero_grad()
        loss.backward()
        opt.step()

    best = max(range(len(nodes)), key=lambda k: (nodes[k].acc, -k))  # first node on ties, as the official
    extras = {
        "nodes": [arch_to_str(n.arch) for n in nodes],
        "node_valid_accs": [n.acc for n in nodes],
        "init_archs": [arch_to_str(a) for a in archs],
        "node_replacements": replaced,
    }
    if cfg.inplace_mutation:
        extras["node_cursors"] = [arch_to_str(n.cursor) for n in nodes]
    return nodes[best].arch, extras


@register_strategy("ase", ASEConfig)
def ase(ctx: SearchContext, cfg: ASEConfig):
    return ase_search(ctx, cfg)
