"""Benchmark: one training step of the OQAT supernets, NB201 vs OFA/MobileNetV3, FP and LSQ-quantized.

Per space and precision: the median time of an SGD step on one batch for the subnets a fixed seed samples
(uniform single-path, as ``train_oqat``), and for the largest and the smallest subnet. Same process, same
batch; quantizers initialised with LSQ's init (as after ``init_step_sizes``). Prints a table in ms and the
OFA / NB201 ratio of the sampled-subnet medians.

    python benchmarks/bench_supernets.py [--batch 64] [--iters 10] [--threads 1] [--device auto]
"""

from __future__ import annotations

import random
import statistics

import torch
from _timing import parse_bench_args, sgd_step, step_times

from zsqpipe.nas.oqat import OQATTrainConfig, build_oqat_supernet, init_step_sizes, oqat_space
from zsqpipe.nas.spaces.ofa import OFASpaceConfig
from zsqpipe.nas.supernet201 import NB201Supernet
from zsqpipe.nas.supernet_ofa import OFASupernet


def step_ms(model, archs, x, y, warmup: int, device) -> float:
    """Median ms of an SGD step, the i-th one on subnet ``archs[i]`` (activating it is part of the step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = sgd_step(model, x, y, opt, before=lambda i: model.set_active_subnet(archs[i]))
    return 1000 * statistics.median(step_times(step, len(archs) - warmup, warmup, device))


def main() -> None:
    args, dev = parse_bench_args(__doc__, batch=64, iters=10, warmup=2, threads=1)
    x = torch.randn(args.batch, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    n = args.warmup + args.iters
    configs = {"nb201 (C=8, N=1)": OQATTrainConfig(bits=args.bits),
               "ofa_mbv3 (CPU default)": OQATTrainConfig(bits=args.bits, space="ofa_mbv3")}  # fmt: skip
    print(f"device {dev}, threads {args.threads}, batch {args.batch}, median of {args.iters} steps (ms)")
    print(f"{'space':<24} {'precision':<9} {'sampled':>9} {'largest':>9} {'smallest':>9}")
    sampled = {}
    for name, cfg in configs.items():
        for precision in ("fp", f"w{args.bits}a{args.bits}"):
            torch.manual_seed(0)
            if precision == "fp":
                if cfg.space == "ofa_mbv3":
                    model = OFASupernet(OFASpaceConfig.from_dict(cfg.ofa), 1, 10)
                else:
                    model = NB201Supernet(cfg.C, cfg.N, 1, 10, affine=False, track_running_stats=True)
            else:
                model = build_oqat_supernet(cfg, 1, 10)
            model = model.to(dev).train()
            if precision != "fp":
                init_step_sizes(model, [x])
            space = oqat_space(cfg)
            rng = random.Random(0)
            rand = [space.sample(rng) for _ in range(n)]
            if cfg.space == "ofa_mbv3":
                small = space.cfg.to_str(space.cfg.smallest)
            else:
                small = ("nor_conv_1x1", "none", "none", "none", "none", "nor_conv_1x1")
            row = [step_ms(model, rand, x, y, args.warmup, dev),
                   step_ms(model, [space.largest] * n, x, y, args.warmup, dev),
                   step_ms(model, [small] * n, x, y, args.warmup, dev)]  # fmt: skip
            sampled[(cfg.space, precision)] = row[0]
            print(f"{name:<24} {precision:<9} " + " ".join(f"{v:9.1f}" for v in row))
    for precision in ("fp", f"w{args.bits}a{args.bits}"):
        r = sampled[("ofa_mbv3", precision)] / sampled[("nb201", precision)]
        print(f"ofa / nb201 ({precision}, sampled subnets): {r:.2f}x")


if __name__ == "__main__":
    main()
