"""Benchmark: synthesis throughput (images x steps / s) and one HAST fine-tuning step vs one `real` step.

Same FP model (ResNet-20, 1x28x28, random weights), same process, CPU or CUDA. The per-step cost of a method is
measured as the difference between runs with k1 and k2 iterations (calibration and start-up cancel out).

    python benchmarks/bench_zsq.py [--threads 2] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _timing import per_step_by_difference

from zsqpipe.data.shards import ShardSet, write_shards
from zsqpipe.engine import resolve_device
from zsqpipe.methods.base import QuantContext
from zsqpipe.methods.hast import HAST
from zsqpipe.methods.real import RealData
from zsqpipe.models import create_model
from zsqpipe.quant import QuantConfig, quantize_model
from zsqpipe.zsq.synth_hast import HASTSynthConfig, synthesize_hast
from zsqpipe.zsq.synthesis import SynthContext


def make_ctx(teacher, dev, samples=None, real=False, batch=128):
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=4))
    for p in student.parameters():
        p.requires_grad_(True)

    def loader(batch_size, seed, augment=True):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield (
                torch.randn(batch_size, 1, 28, 28, generator=g).to(dev),
                torch.randint(0, 10, (batch_size,)).to(dev),
            )

    return QuantContext(
        teacher=teacher, student=student, device=dev, seed=0, num_classes=10, input_shape=(1, 28, 28),
        train_loader_factory=loader if real else None, end_epoch=lambda e, x: {}, log=lambda s: None,
        samples=samples,
    )  # fmt: skip


def time_method(cls, cfg, teacher, dev, samples=None, real=False, k1=2, k2=6) -> float:
    ctxs = {k: make_ctx(teacher, dev, samples, real) for k in (k1, k2)}  # built before timing
    return per_step_by_difference(lambda k: cls({**cfg, "epochs": 1, "iters_per_epoch": k}).run(ctxs[k]), k1, k2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--synth-batch", type=int, default=256)
    ap.add_argument("--synth-iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    teacher = create_model("resnet20", 10, 1, 28).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    cfg = HASTSynthConfig(num_samples=args.synth_batch, batch_size=args.synth_batch, iters=args.synth_iters)
    sctx = SynthContext(10, (1, 28, 28), dev, torch.Generator().manual_seed(0), lambda s: None)
    t = time.perf_counter()
    images, labels = synthesize_hast(teacher, cfg, sctx)
    synth_s = time.perf_counter() - t
    throughput = args.synth_batch * args.synth_iters / synth_s

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), images.cpu(), labels.cpu(), torch.zeros(len(labels)), "hast", 0)
        shards = ShardSet.open(Path(tmp) / "manifest.json")
        hast = time_method(HAST, {"batch_size": 64, "calib_iters": 2}, teacher, dev, samples=shards)
        hast128 = time_method(HAST, {"batch_size": 128, "calib_iters": 2}, teacher, dev, samples=shards)
    real = time_method(RealData, {"batch_size": 128, "calib_batches": 1}, teacher, dev, real=True)
    print(f"device={dev} threads={args.threads}")
    print(f"hast synthesis: {throughput:.0f} images x steps / s (batch {args.synth_batch})")
    print(f"real step (batch 128): {real * 1e3:.0f} ms")
    print(f"hast step (batch 64, official): {hast * 1e3:.0f} ms  ratio to real: {hast / real:.2f}")
    print(f"hast step (batch 128): {hast128 * 1e3:.0f} ms  ratio to real: {hast128 / real:.2f}")


if __name__ == "__main__":
    main()
