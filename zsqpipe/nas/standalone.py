"""Stand-alone training of one NB201 cell (the ground truth of supernet ranking at our budget).

Used by the ``groundtruth`` stage (the sampled cells) and by ``supernet-search`` (the found cells), with the
recipe of ``supernet.groundtruth`` (:class:`zsqpipe.stages.groundtruth.GroundTruthConfig`: ``C``, ``N``,
``seeds``, ``batch_size``, ``augment``, ``epochs``, ``iters``, ``lr``, ``momentum``, ``wd``, ``nesterov``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from zsqpipe.data import make_loader
from zsqpipe.engine import evaluate, setup_runtime
from zsqpipe.nas.supernet201 import NB201Supernet


def standalone_network(arch, C: int, N: int, in_channels: int, num_classes: int) -> NB201Supernet:
    """The NB201 network of one cell: the supernet skeleton with the cell fixed, BN with affine parameters and
    running statistics (NB201's stand-alone networks; the supernet itself follows DYNAS: no affine, no
    running statistics). Parameters of the unused ops stay untouched: they never get a gradient."""
    return NB201Supernet(
        C, N, in_channels, num_classes, affine=True, track_running_stats=True
    ).set_active_subnet(arch)


def train_standalone(model: torch.nn.Module, loader, cfg, device) -> dict:
    """SGD (Nesterov) with a per-step cosine LR to 0 over epochs x iters steps, cross-entropy. The loader's
    batches are read as one stream across epochs (``iters`` smaller than the loader = a subsample per epoch).
    Returns the mean training loss and top-1 of the last epoch."""
    model.to(device).train()
    iters = cfg.iters if cfg.iters is not None else len(loader)
    total = cfg.epochs * iters
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                          nesterov=cfg.nesterov and cfg.momentum > 0)  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1), eta_min=0.0)

    def stream():
        while True:
            yield from loader

    data = stream()
    loss_sum = hits = seen = 0.0
    for t in range(total):
        x, y = next(data)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if t >= total - iters:  # last epoch's statistics
            loss_sum += float(loss.detach()) * len(y)
            hits += float((logits.detach().argmax(1) == y).sum())
            seen += len(y)
    return {"train_loss": loss_sum / max(seen, 1), "train_top1": 100.0 * hits / max(seen, 1), "steps": total}


def train_cell_runs(
    arch, cfg, data, val, test, device, threads: int | None = None
) -> list[dict]:
    """One stand-alone training of ``arch`` per seed of ``cfg.seeds`` (runtime seeded first, the loader seeded
    with the same seed): ``[{seed, valid_acc, test_acc, train_loss, train_top1, steps, time_s}]``; ``val`` and
    ``test`` are evaluation loaders. Shared by ``groundtruth`` and ``supernet-search`` (its found cells)."""
    info = data.info
    runs = []
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        setup_runtime(threads, seed)
        model = standalone_network(arch, cfg.C, cfg.N, info.in_channels, info.num_classes)
        loader = make_loader(data.train, info, cfg.batch_size, train=True, seed=seed, device=device,
                             augment=cfg.augment)  # fmt: skip
        train = train_standalone(model, loader, cfg, device)
        v, t = evaluate(model, val), evaluate(model, test)
        runs.append({"seed": seed, "valid_acc": v["top1"], "test_acc": t["top1"], **train,
                     "time_s": time.perf_counter() - t0})  # fmt: skip
    return runs
