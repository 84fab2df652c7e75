"""OQAT supernet training: SPOS uniform single-path sampling with shared LSQ step sizes."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from zsqpipe.data.loaders import endless
from zsqpipe.engine import Timer
from zsqpipe.nas.calr import cosine_factor
from zsqpipe.nas.oqat.config import OQATTrainConfig, Supernet
from zsqpipe.nas.oqat.supernet import lsq_quantizers, oqat_space
from zsqpipe.nas.supernet201 import single_path_epochs
from zsqpipe.resume import Checkpoints, PyRandomState, attach_epoch_loop

# ----------------------------------------------------------------------------------------------------------
# Training


def train_oqat(
    model: Supernet,
    loader: Iterable,
    cfg: OQATTrainConfig,
    device=None,
    log: Callable[[str], None] | None = print,
    on_epoch: Callable[[int, dict], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[dict]:
    """Quantization-aware supernet training at the model's bits (OQAT step 1, or the fine-tuning after bit
    inheritance). Per iteration t of T = epochs x iters (SPOS uniform single-path sampling; OQAT samples OFA
    subnets, its exact rule is unreleased):

        alpha ~ U(space) (NB201: 15,625 cells; OFA: each ks, e, d uniform);  lr = lr0 (1 + cos(pi t/T)) / 2
        zero_grad; CE(subnet_alpha(x), y); backward (LSQ gradients, scaled by 1/sqrt(N Q_P)); clip; SGD step

    Weights and the shared step sizes are updated together; only the parameters the subnet used get a
    gradient (zero_grad to None). Subnets come from ``random.Random(cfg.seed)``; the caller seeds torch and
    the loader. ``checkpoints``: resume from / save epoch checkpoints (model, optimizer, subnet sampler, data
    stream position; restored epochs are passed to ``on_epoch`` again). Returns one record per epoch."""
    device = device if device is not None else next(model.parameters()).device
    model.to(device).train()
    iters = cfg.iters if cfg.iters is not None else len(loader)  # type: ignore[arg-type]
    total = cfg.epochs * iters
    steps = [p for _, q in lsq_quantizers(model) for p in q.parameters()]
    step_ids = {id(p) for p in steps}
    weights = [p for p in model.parameters() if id(p) not in step_ids and p.requires_grad]
    groups = [{"params": weights, "weight_decay": cfg.wd}]
    if steps:
        groups.append({"params": steps, "weight_decay": 0.0})
    opt = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )
    rng = random.Random(cfg.seed)
    space = oqat_space(model)
    data = endless(loader)  # the batches of cycle_batches(loader), with a position that can be saved
    if log is not None:
        log(
            f"oqat: w{model.oqat_bits}a{model.oqat_bits} supernet, T={total} ({cfg.epochs} epochs x {iters} iters)"
        )
    history: list[dict] = []
    timer = Timer()
    first = attach_epoch_loop(checkpoints, history, timer, on_epoch, model=model, optimizer=opt,
                              sampler=PyRandomState(rng), data=data)  # fmt: skip

    def step(t: int, x: torch.Tensor, y: torch.Tensor):
        lr = cfg.lr * cosine_factor(t, total)
        for g in opt.param_groups:
            g["lr"] = lr
        model.set_active_subnet(space.sample(rng))
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss, logits, lr

    return single_path_epochs(step, data, device, cfg.epochs, iters, first, history, timer,
                              f"oqat w{model.oqat_bits}", log, on_epoch, checkpoints)  # fmt: skip
