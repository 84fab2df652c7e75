"""Benchmark: synthesis throughput (images x steps / s) of the ``hast`` and ``zeroq`` synthesizers vs a plain loop.

The synthesizers (``synthesize_hast``, ``synthesize_zeroq``: hooks, loss, ``optimise_pixels`` with Adam +
ReduceLROnPlateau, logging) against a plain PyTorch loop written here that does the same optimisation: Adam on
the pixels of one batch, the same BN-statistics loss (HAST: batch statistics + beta * focal CE; ZeroQ:
per-image statistics + the input-level term), the same scheduler, on the same ResNet-20 teacher. The plain loop
runs twice, in NCHW (as the official distill_data.py code) and in channels_last, so the ratio shows both the
harness's cost and whether the memory format pays. The per-step cost is the difference between runs of k1 and
k2 steps divided by k2 - k1, so set-up (hooks, initial images, final scoring) cancels out.

    python benchmarks/bench_synth.py [--threads 1] [--batch 256] [--k1 5] [--k2 25] [--device auto] [--compile]

``--compile`` adds one line: the HAST loss + gradient step (the synthesizer's inner work: teacher forward with
the BN hooks, batch-statistics + focal CE loss, gradient w.r.t. the pixels) eager vs ``torch.compile``d, its
compile time, and the relative difference of the two gradients (compiled kernels are not bit-identical, so a
compiled synthesis gives other samples than the eager one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import per_step_by_difference, step_times

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zsqpipe.engine import resolve_device  # noqa: E402
from zsqpipe.models import create_model  # noqa: E402
from zsqpipe.zsq.synth_hast import HASTSynthConfig, synthesize_hast  # noqa: E402
from zsqpipe.zsq.synth_zeroq import ZeroQSynthConfig, synthesize_zeroq  # noqa: E402
from zsqpipe.zsq.synthesis import SynthContext  # noqa: E402


def teacher_model(dev: torch.device) -> torch.nn.Module:
    """ResNet-20 (1x28x28) with non-trivial BN running statistics (a few train-mode forwards of noise)."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1, 28).to(dev).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(256, 1, 28, 28, device=dev) * 2 + 0.5)
    return model.eval().requires_grad_(False)


def stage(name: str, teacher, dev, batch: int, iters: int) -> None:
    ctx = SynthContext(10, (1, 28, 28), dev, torch.Generator().manual_seed(0), lambda s: None)
    if name == "hast":
        synthesize_hast(teacher, HASTSynthConfig(num_samples=batch, batch_size=batch, iters=iters), ctx)
    else:
        synthesize_zeroq(teacher, ZeroQSynthConfig(num_samples=batch, batch_size=batch, iters=iters), ctx)


def plain(name: str, teacher, dev, batch: int, iters: int, channels_last: bool) -> None:
    """The same optimisation written directly: hooks on the BN inputs, Adam + ReduceLROnPlateau on x."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = teacher.to(memory_format=fmt)
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    inputs = [None] * len(bns)
    handles = [
        m.register_forward_hook(lambda _m, inp, _o, i=i: inputs.__setitem__(i, inp[0]))
        for i, m in enumerate(bns)
    ]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(dev).contiguous(memory_format=fmt).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.5)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=10)

    def hast_loss():
        logits = teacher(x)
        log_p = F.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        focal = ((1 - log_p.exp()).clamp_min(1e-12) ** 2 * -log_p).mean()
        bn = sum(F.mse_loss(a.mean((0, 2, 3)), m.running_mean) + F.mse_loss(a.var((0, 2, 3), unbiased=False),
                 m.running_var) for m, a in zip(bns, inputs, strict=True)) / len(bns)  # fmt: skip
        return 10 * focal + bn

    def zeroq_loss():
        teacher(x)
        loss = 0.0
        for m, a in zip(bns, inputs, strict=True):
            std = a.var((2, 3), unbiased=False).add(m.eps).sqrt()
            loss = loss + ((a.mean((2, 3)) - m.running_mean) ** 2).sum(1).mean()
            loss = loss + ((std - m.running_var.add(m.eps).sqrt()) ** 2).sum(1).mean()
        std_in = x.var((2, 3), unbiased=False).add(1e-6).sqrt()
        return loss + (x.mean((2, 3)) ** 2).sum(1).mean() + ((std_in - 1) ** 2).sum(1).mean()

    loss_fn = hast_loss if name == "hast" else zeroq_loss
    for _ in range(iters):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step(float(loss.detach()))
    for h in handles:
        h.remove()


def compiled_hast_step(dev: torch.device, batch: int, steps: int = 20) -> None:
    """Seconds per HAST loss + pixel-gradient step, eager vs torch.compile (default mode), on one teacher."""
    from zsqpipe.zsq.bnstats import BNStatistics
    from zsqpipe.zsq.synth_hast import hard_sample_ce

    teacher = teacher_model(dev).to(memory_format=torch.channels_last)
    bn = BNStatistics(teacher)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def loss_fn(inp):
        return 10 * hard_sample_ce(teacher(inp), y, 2.0) + bn.batch_loss()

    def grad(fn):
        (gx,) = torch.autograd.grad(fn(x), [x])
        return gx

    def per_step(fn):
        times = step_times(lambda _i: grad(fn), steps, 3, dev)
        return sum(times) / len(times)

    eager = per_step(loss_fn)
    compiled_fn = torch.compile(loss_fn)
    (compile_s,) = step_times(lambda _i: grad(compiled_fn), 1, 0, dev)  # the first call compiles
    compiled = per_step(compiled_fn)
    g_eager, g_compiled = grad(loss_fn), grad(compiled_fn)
    rel = float((g_eager - g_compiled).norm() / g_eager.norm())
    bn.remove()
    print(f"hast step: eager {eager:.3f} s, compiled {compiled:.3f} s ({eager / compiled:.2f}x), compile "
          f"{compile_s:.0f} s, gradient relative difference {rel:.1e}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k1", type=int, default=5)
    ap.add_argument("--k2", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="also time the HAST step under torch.compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    print(f"ResNet-20 1x28x28 teacher, batch {args.batch}, device={dev}, threads={args.threads}, "
          f"per step = (t({args.k2}) - t({args.k1})) / {args.k2 - args.k1}")  # fmt: skip
    print(f"{'synth':<6} {'stage img*steps/s':>18} {'plain NCHW':>11} {'plain CL':>9} {'stage/NCHW':>11} "
          f"{'stage/CL':>9}")  # fmt: skip
    for name in ("hast", "zeroq"):
        rates = []
        for run in (
            lambda k, name=name: stage(name, teacher_model(dev), dev, args.batch, k),
            lambda k, name=name: plain(name, teacher_model(dev), dev, args.batch, k, channels_last=False),
            lambda k, name=name: plain(name, teacher_model(dev), dev, args.batch, k, channels_last=True),
        ):
            rates.append(args.batch / per_step_by_difference(run, args.k1, args.k2, warmup=True))
        s, nchw, cl = rates
        print(f"{name:<6} {s:18.0f} {nchw:11.0f} {cl:9.0f} {s / nchw:11.2f} {s / cl:9.2f}", flush=True)
    if args.compile:
        compiled_hast_step(dev, args.batch)


if __name__ == "__main__":
    main()
