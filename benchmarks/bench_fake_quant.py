"""Benchmark: zsqpipe's fake-quant function vs PyTorch's fused fake_quantize kernel (per tensor, CPU/CUDA).

python benchmarks/bench_fake_quant.py [--numel 12544000] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time as timeit

from zsqpipe.quant.functional import fake_quant_per_tensor, qparams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1000,16,28,28")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(*map(int, args.shape.split(","))).relu().contiguous(memory_format=torch.channels_last)
    lo, hi = torch.tensor(0.0), x.max()
    scale, zp = qparams(lo, hi, args.bits)
    zp_i = zp.to(torch.int32).reshape(1)
    with torch.no_grad():
        ours = timeit(lambda: fake_quant_per_tensor(x, lo, hi, args.bits), args.reps)
        fused = timeit(
            lambda: torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp_i, 0, 2**args.bits - 1),
            args.reps,
        )
        relu = timeit(lambda: torch.relu(x), args.reps)
    print(f"shape={tuple(x.shape)} threads={args.threads}")
    print(
        f"zsqpipe fake_quant: {ours * 1e3:7.1f} ms | torch fused: {fused * 1e3:7.1f} ms | relu: {relu * 1e3:6.1f} ms"
    )
    print(f"ratio torch fused / zsqpipe: {fused / ours:.2f}")


if __name__ == "__main__":
    main()
