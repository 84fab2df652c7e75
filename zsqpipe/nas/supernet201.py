"""NAS-Bench-201 weight-sharing supernet, SPOS / DYNAS training loop and per-subnet evaluation.

The macro skeleton is NB201's (Dong & Yang, ICLR 2020; the "RANDOM" search model used by DYNAS' SPOS code):
stem conv3x3 + BN, three stages of N cells with C, 2C, 4C channels and a ResNet basic block (stride 2)
between stages, BN + ReLU, global average pooling, linear classifier. Every cell edge holds the five NB201
ops (none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3; convs are ReLU-Conv-BN); one
architecture (``set_active_subnet``) is shared by all cells and ``forward`` runs only its op on each edge.

BN follows DYNAS' NB201 code: ``affine=False`` everywhere, and ``track_running_stats=False`` by default, so
batch statistics are used in training *and* evaluation (no recalibration). With
``track_running_stats=True`` the running statistics are meaningless after weight-sharing training and must
be re-estimated per subnet with :func:`recalibrate_bn` before evaluation (``evaluate_subnets`` does).
docs/methods/supernet.md lists the choices.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.data.loaders import endless
from zsqpipe.engine import Timer
from zsqpipe.errors import ConfigError
from zsqpipe.nas.calr import (
    GroupedSGD,
    SupernetConfig,
    as_arch,
    calr_matched_scale,
    cosine_factor,
    group_of,
    ms_groups,
    sample_arch,
)
from zsqpipe.nas.spaces.nb201 import EDGES, OPS, Arch
from zsqpipe.progress import progress
from zsqpipe.resume import Checkpoints, GradPresence, PyRandomState, attach_epoch_loop


def _bn(c: int, affine: bool, track: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, affine=affine, track_running_stats=track)


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv (no bias: a bias in front of BN is cancelled by its mean subtraction) -> BN."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, affine: bool, track: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
            _bn(c_out, affine, track),
        )


class ResNetBlock(nn.Module):
    """NB201 reduction block: ReLUConvBN 3x3 stride 2 -> ReLUConvBN 3x3, plus avgpool 2x2 -> conv1x1."""

    def __init__(self, c_in: int, c_out: int, affine: bool, track: bool):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, affine, track)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, affine, track)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0), nn.Conv2d(c_in, c_out, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


def _make_op(name: str, c: int, affine: bool, track: bool) -> nn.Module | None:
    if name == "none":
        return None  # contributes zero: the edge is skipped in forward
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(c, c, 1, 1, affine, track)
    if name == "nor_conv_3x3":
        return ReLUConvBN(c, c, 3, 1, affine, track)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(name)


class SearchCell(nn.Module):
    """4-node NB201 cell; ``edges[e][op]`` is the module of op ``op`` on edge ``EDGES[e]``."""

    def __init__(self, c: int, affine: bool, track: bool):
        super().__init__()
        self.edges = nn.ModuleList(
            nn.ModuleDict({op: m for op in OPS if (m := _make_op(op, c, affine, track)) is not None})
            for _ in EDGES
        )

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        # only the nodes the output depends on through non-'none' edges are computed
        needed = {3}
        for e in reversed(range(len(EDGES))):
            dst, src = EDGES[e]
            if dst in needed and arch[e] != "none":
                needed.add(src)
        nodes: dict[int, torch.Tensor | None] = {0: x}
        for n in (1, 2, 3):
            if n not in needed:
                continue
            terms = [
                self.edges[e][arch[e]](nodes[src])
                for e, (dst, src) in enumerate(EDGES)
                if dst == n and arch[e] != "none" and nodes[src] is not None
            ]
            nodes[n] = sum(terms[1:], terms[0]) if terms else None
        return nodes[3] if nodes[3] is not None else torch.zeros_like(x)


class NB201Supernet(nn.Module):
    """NB201 weight-sharing supernet. ``C``: channels of the first stage (then 2C, 4C); ``N``: cells per
    stage; paper size C=16, N=5 on 3x32x32; e.g. C=8, N=1 on 1x28x28 for tests. ``forward`` returns logits
    of the subnet set by :meth:`set_active_subnet`."""

    def __init__(
        self,
        C: int = 16,
        N: int = 5,
        in_channels: int = 3,
        num_classes: int = 10,
        affine: bool = False,
        track_running_stats: bool = False,
    ):
        super().__init__()
        self.C, self.N, self.in_channels, self.num_classes = C, N, in_channels, num_classes
        self.track_running_stats = track_running_stats
        a, t = affine, track_running_stats
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), _bn(C, a, t))
        layers: list[nn.Module] = []
        for stage, c in enumerate((C, 2 * C, 4 * C)):
            if stage:
                layers.append(ResNetBlock(c // 2, c, a, t))
            layers += [SearchCell(c, a, t) for _ in range(N)]
        self.cells = nn.ModuleList(layers)
        self.lastact = nn.Sequential(_bn(4 * C, a, t), nn.ReLU(inplace=False))
        self.classifier = nn.Linear(4 * C, num_classes)
        self.arch: Arch | None = None

    def set_active_subnet(self, arch: Arch | Sequence[str] | str | int) -> NB201Supernet:
        """Select the cell (op tuple, NB201 string or table index) that ``forward`` runs in every cell."""
        self.arch = as_arch(arch)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch is None:
            raise RuntimeError("NB201Supernet: call set_active_subnet(arch) before forward")
        h = self.stem(x)
        for layer in self.cells:
            h = layer(h, self.arch) if isinstance(layer, SearchCell) else layer(h)
        h = self.lastact(h)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def build_supernet(cfg: SupernetConfig, in_channels: int, num_classes: int) -> NB201Supernet:
    """The supernet ``cfg`` describes (C, N, BN running statistics) for a dataset's shape."""
    return NB201Supernet(
        C=cfg.C,
        N=cfg.N,
        in_channels=in_channels,
        num_classes=num_classes,
        track_running_stats=cfg.bn_track_running_stats,
    )


# ----------------------------------------------------------------------------------------------------------
# BN recalibration and evaluation


def _tracking_bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _to(batch, device):
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int, device=None) -> int:
    """Re-estimate the running statistics of every BN that tracks them, as the exact average over the first
    ``batches`` batches of ``loader`` with the active subnet (statistics reset first; momentum=None, i.e.
    a cumulative average). Returns the number of batches used; 0 (and nothing done) when no BN tracks
    running statistics (DYNAS' default: batch statistics are used in evaluation anyway)."""
    bns = _tracking_bns(model)
    if not bns or batches <= 0:
        return 0
    device = device if device is not None else next(model.parameters()).device
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for batch in islice(loader, batches):
            model(_to(batch, device)[0])
            n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return n


@torch.no_grad()
def evaluate_subnets(
    model: NB201Supernet,
    archs: Iterable[Arch | str | int],
    loader_train_for_bn: Iterable | None,
    loader_eval: Iterable,
    bn_batches: int = 10,
    device=None,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Top-1 accuracy (%) of each subnet on ``loader_eval``, in the order of ``archs``.

    Both loaders are read once and their batches reused for every subnet (keep the evaluation set small
    on CPU). When the supernet's BN tracks running statistics, they are recalibrated per subnet on the
    first ``bn_batches`` batches of ``loader_train_for_bn``; otherwise (DYNAS) the model runs in eval mode
    with batch statistics, so accuracies depend on the evaluation batch size (DYNAS: 256)."""
    device = device if device is not None else next(model.parameters()).device
    eval_batches = [_to(b, device) for b in loader_eval]
    bn_data = (
        [_to(b, device) for b in islice(loader_train_for_bn, bn_batches)]
        if _tracking_bns(model) and loader_train_for_bn is not None
        else []
    )
    was_training = model.training
    accs: list[float] = []
    timer = time.perf_counter()
    archs = [as_arch(a) for a in archs]
    for i, arch in enumerate(archs):
        model.set_active_subnet(arch)
        recalibrate_bn(model, bn_data, len(bn_data), device)
        model.eval()
        hits, n = 0, 0
        for x, y in eval_batches:
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
        accs.append(100.0 * hits / max(n, 1))
        if log is not None and ((i + 1) % 50 == 0 or i + 1 == len(archs)):
            log(f"evaluated {i + 1}/{len(archs)} subnets ({time.perf_counter() - timer:.0f}s)")
    model.train(was_training)
    return accs


# ----------------------------------------------------------------------------------------------------------
# Training


def cycle_batches(loader: Iterable):
    """Batches of ``loader`` without end (a new pass each time it is exhausted); an empty loader is an error."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("supernet training: the training loader is empty")


def single_path_epochs(
    step: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, float]],
    data,
    device,
    epochs: int,
    iters: int,
    first: int,
    history: list[dict],
    timer: Timer,
    desc: str,
    log: Callable[[str], None] | None = print,
    on_epoch: Callable[[int, dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
    epoch_extras: Callable[[], dict] | None = None,
) -> list[dict]:
    """The epoch loop of single-path supernet training (``train_supernet``, ``train_oqat``): epochs
    ``first..epochs-1`` of ``iters`` iterations; iteration t gets the next batch of ``data`` and runs
    ``step(t, x, y) -> (loss, logits, lr)`` (sample a subnet, set the LR, one optimizer step). Per epoch one
    record (train loss and top-1 over its subnets, mean LR, ``epoch_extras()``, time) is appended to
    ``history``, passed to ``on_epoch``, logged, and the epoch is checkpointed."""
    for epoch in range(first, epochs):
        loss_sum = torch.zeros((), device=device)
        hit_sum = torch.zeros((), device=device)
        n_seen, lr_sum = 0, 0.0
        for it in progress(range(iters), desc=f"{desc} epoch {epoch + 1}/{epochs}"):
            x, y = _to(next(data), device)
            loss, logits, lr = step(epoch * iters + it, x, y)
            loss_sum += loss.detach() * len(y)
            hit_sum += (logits.detach().argmax(1) == y).sum()
            n_seen += len(y)
            lr_sum += lr
        rec = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / max(n_seen, 1),
            "train_top1": 100.0 * float(hit_sum) / max(n_seen, 1),
            "lr_mean": lr_sum / max(iters, 1),
            **(epoch_extras() if epoch_extras is not None else {}),
            "time_s": timer(),
        }
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)
        if log is not None:
            log(
                f"epoch {epoch}: loss {rec['train_loss']:.4f} top1 {rec['train_top1']:.2f} "
                f"lr {rec['lr_mean']:.4g} ({rec['time_s']:.0f}s)"
            )
        if checkpoints is not None:
            checkpoints.save(epoch)
    return history


def train_supernet(
    model: NB201Supernet,
    loader: Iterable,
    cfg: SupernetConfig,
    device=None,
    log: Callable[[str], None] | None = print,
    on_epoch: Callable[[int, dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[dict]:
    """Train the supernet with SPOS uniform single-path sampling (one subnet per iteration), optionally with
    DYNAS' CaLR and MS (``cfg.use_calr`` / ``cfg.use_ms``). Per iteration t of T = epochs x iters:

        alpha ~ U(15,625 cells);  g = alpha[e*] (MS) or "shared"
        lr_g = lr0 (1 - t/T)^gamma(alpha) (CaLR) or lr0 (1 + cos(pi t/T)) / 2
        zero_grad; CE loss of subnet alpha; backward; clip-norm; SGD step with group g's momentum

    Subnets are drawn from ``random.Random(cfg.seed)`` (the same sequence with and without CaLR/MS);
    parameter init and loader order are the caller's (seed torch first). Returns one record per epoch
    (train loss/top-1 over the epoch's subnets, mean LR, split edge, per-group step counts, time);
    ``on_epoch(epoch, record)`` is called after each epoch (e.g. to log metrics). ``checkpoints``: resume
    from / save epoch checkpoints (model, every group's optimizer, subnet sampler, data position; restored
    epochs are passed to ``on_epoch`` again)."""
    device = device if device is not None else next(model.parameters()).device
    model.to(device).train()
    iters = cfg.iters if cfg.iters is not None else len(loader)  # type: ignore[arg-type]
    total = cfg.epochs * iters
    split_edge = cfg.resolved_split_edge()
    for key, have in (("C", model.C), ("N", model.N), ("bn_track_running_stats", model.track_running_stats)):
        if getattr(cfg, key) != have:
            raise ConfigError(
                f"supernet.{key}: the config says {getattr(cfg, key)!r}, the model has {have!r}"
            )
    calr = cfg.make_calr(model)
    opt = GroupedSGD(
        model.parameters(),
        ms_groups(cfg.use_ms),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.wd,
        nesterov=cfg.nesterov,
    )
    rng = random.Random(cfg.seed)
    scale = 1.0  # summed_lr: calr -> the cosine LR scaled to CaLR's sum over the same subnet sequence
    if calr is None and cfg.summed_lr == "calr":
        replay = random.Random(cfg.seed)
        scale = calr_matched_scale(cfg.make_calr(model, matched=True), [sample_arch(replay) for _ in range(total)])
    data = endless(loader)  # the batches of cycle_batches(loader), with a position that can be saved
    if log is not None:
        log(
            f"supernet {cfg.method}: calr={cfg.use_calr} ms={cfg.use_ms} split_edge={split_edge} "
            f"T={total} ({cfg.epochs} epochs x {iters} iters)"
            + (f", cosine LR x {scale:.4f} (summed LR matched to CaLR)" if scale != 1.0 else "")
        )
    history: list[dict] = []
    timer = Timer()
    grads = None if cfg.zero_grad_to_none else GradPresence(model.parameters())
    first = attach_epoch_loop(checkpoints, history, timer, on_epoch, model=model, optimizer=opt,
                              sampler=PyRandomState(rng), data=data, grad_presence=grads)  # fmt: skip
    last_steps = dict(opt.steps)  # per-group step counts at the start of the epoch (restored on resume)

    def step(t: int, x: torch.Tensor, y: torch.Tensor):
        arch = sample_arch(rng)
        group = group_of(arch, split_edge)
        lr = cfg.lr * (calr.factor(arch, t, total) if calr is not None else scale * cosine_factor(t, total))
        opt.set_lr(group, lr)
        model.set_active_subnet(arch)
        opt.zero_grad(set_to_none=cfg.zero_grad_to_none)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(group)
        return loss, logits, lr

    def epoch_extras() -> dict:
        nonlocal last_steps
        done = {g: opt.steps[g] - last_steps[g] for g in opt.groups}
        last_steps = dict(opt.steps)
        return {"split_edge": split_edge, "group_steps": done}

    return single_path_epochs(step, data, device, cfg.epochs, iters, first, history, timer, "supernet", log,
                              on_epoch, checkpoints, epoch_extras)  # fmt: skip


class SupernetEvaluator:
    """``arch -> top-1 (%)`` of the subnet on fixed validation batches after BN recalibration on fixed
    training batches (:func:`zsqpipe.nas.supernet201.evaluate_subnets`), cached per cell. ``calls`` counts
    queries, ``scores`` holds the distinct cells scored."""

    def __init__(self, model, bn_batches: list, val_batches: list, device):
        self.model, self.bn, self.val, self.device = model, bn_batches, val_batches, device
        self.scores: dict[Arch, float] = {}
        self.calls = 0

    def __call__(self, arch: Arch) -> float:
        self.calls += 1
        arch = tuple(arch)
        if arch not in self.scores:
            self.scores[arch] = evaluate_subnets(
                self.model, [arch], self.bn, self.val, len(self.bn), self.device
            )[0]
        return self.scores[arch]
