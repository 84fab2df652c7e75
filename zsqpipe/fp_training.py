"""Supervised full-precision training (the ``fp-model`` stage's loop): SGD with a per-step LR schedule,
validation after every epoch, optional LBT gradient quantization, epoch checkpoints.

Kept out of ``zsqpipe.quant`` on purpose: the FP model's code version must not cover the quantizers."""

from __future__ import annotations

import torch.nn.functional as F

from zsqpipe.config import FPConfig
from zsqpipe.data import make_loader
from zsqpipe.data.loaders import order_generator
from zsqpipe.engine import Timer, evaluate, make_optimizer, make_scheduler
from zsqpipe.gradquant import GradQuantConfig, enable_grad_quant
from zsqpipe.progress import progress
from zsqpipe.resume import Checkpoints, attach_epoch_loop
from zsqpipe.tracking import Tracker


def train_fp(
    model,
    data,
    cfg: FPConfig,
    device,
    tracker: Tracker,
    log=print,
    checkpoints: Checkpoints | None = None,
    timer: Timer | None = None,
) -> list[dict]:
    """Supervised training with a per-step LR schedule; validation accuracy after each epoch (the test set is
    used once, on the final model). ``checkpoints``: resume from / save epoch checkpoints; ``timer``: the
    stage's clock (set forward by the restored epochs' time on resume)."""
    loader = make_loader(
        data.train,
        data.info,
        cfg.batch_size,
        train=True,
        seed=cfg.seed,
        device=device,
        channels_last=cfg.channels_last,
        augment=cfg.augment,
    )
    val = make_loader(data.val, data.info, cfg.eval_batch_size, train=False, device=device,
                      channels_last=cfg.channels_last)  # fmt: skip
    opt = make_optimizer(
        model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov
    )
    steps_per_epoch = (
        len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    )
    sched = make_scheduler(opt, cfg.schedule, cfg.epochs * steps_per_epoch, cfg.warmup_frac, cfg.milestones)
    grads = enable_grad_quant(model, GradQuantConfig.from_dict(cfg.grad_quant or {}, "fp_model.grad_quant"))
    history, timer = [], timer or Timer()

    def log_epoch(epoch: int, rec: dict) -> None:
        tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=epoch)

    # restored epochs go to this MLflow run too; each epoch starts a new pass of the loader: its generator is
    # the whole data-order state
    start = attach_epoch_loop(checkpoints, history, timer, log_epoch, model=model, optimizer=opt, scheduler=sched,
                              grad_quant=grads, data_order=order_generator(loader))  # fmt: skip
    for epoch in range(start, cfg.epochs):
        model.train()
        total, steps = 0.0, 0
        bar = progress(total=steps_per_epoch, desc=f"fp epoch {epoch + 1}/{cfg.epochs}")
        for x, y in loader:
            if steps == steps_per_epoch:
                break
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            grads.update_intervals()
            sched.step()
            total += float(loss.detach())
            steps += 1
            bar.update()
        bar.close()
        v = evaluate(model, val)
        rec = {"epoch": epoch, "train_loss": total / max(steps, 1), "val_top1": v["top1"], "time_s": timer()}
        if grads.layers:
            rec["grad_gamma_mean"] = sum(grads.gammas().values()) / len(grads.layers)
        history.append(rec)
        log_epoch(epoch, rec)
        log(f"epoch {epoch}: loss {rec['train_loss']:.4f} val {v['top1']:.2f} ({rec['time_s']:.0f}s)")
        if checkpoints is not None:
            checkpoints.save(epoch)
    grads.remove()
    return history
