"""Benchmark: the per-batch cost of an activation range rule while ranges are observed (calibration; ZAQ's running
ranges observe every step): ``ema_minmax`` (the papers' min/max) vs ``ema_mse`` (the MSE-optimal clip of a strided
sample, docs/quantization.md "Activation range rule"), one quantizer, observe + fake-quantize, CPU or CUDA.

python benchmarks/bench_act_range.py [--shape 128,16,28,28] [--bits 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time

from zsqpipe.quant.quantizers import create_quantizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="128,16,28,28", help="one activation batch (the stem's output at batch 128)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randn(*map(int, args.shape.split(",")), device=device).relu()
    x = x.contiguous(memory_format=torch.channels_last)
    print(f"shape={tuple(x.shape)} bits={args.bits} threads={args.threads} device={device}")
    times = {}
    for rule in ("ema_minmax", "ema_mse"):
        q = create_quantizer(rule, "act", args.bits).to(device)
        q.update_ranges = True

        def step(q=q):
            with torch.no_grad():
                q(x)
            if device.type == "cuda":
                torch.cuda.synchronize()

        times[rule] = median_time(step, args.reps)
        print(f"{rule:11s} observe + fake-quant: {times[rule] * 1e3:7.2f} ms per batch")
    print(f"ema_mse - ema_minmax: {(times['ema_mse'] - times['ema_minmax']) * 1e3:.2f} ms per quantizer and batch")


if __name__ == "__main__":
    main()
