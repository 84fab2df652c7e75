"""Benchmark: on this machine's cores, is one job with T threads or T jobs with 1 thread the better use?

The workflow gives each rule its ``threads`` (fp_model 2: it runs alone at the top of the DAG; synthesize and
the many quantize / supernet / NAS jobs 1, so that Snakemake runs two of them side by side on 2 cores). For each kind of work this measures the
steps per second of (a) one process with all ``--cores`` threads and (b) ``--cores`` processes with one thread
each running at once (total steps / wall time of the slowest), with the same per-step work: an FP ResNet-20
SGD step (batch 128), a W4A4 fake-quant KD step (batch 128, the ``real`` method's step) and a HAST synthesis
step (Adam on 256 images' pixels). Ratio = (b) / (a): above 1, parallel single-thread jobs win.

    python benchmarks/bench_threads.py [--cores 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = ("fp_step", "quant_step", "synth_step")


def worker(kind: str, threads: int, steps: int) -> float:
    """Run ``steps`` steps of ``kind`` after 3 warm-up steps; returns the seconds of the timed steps."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from zsqpipe.engine import kd_kl
    from zsqpipe.models import create_model
    from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state
    from zsqpipe.zsq.bnstats import BNStatistics
    from zsqpipe.zsq.synth_hast import HASTSynthConfig, hast_synthesis_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1, 28).to(memory_format=torch.channels_last)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    if kind == "fp_step":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    elif kind == "quant_step":
        teacher = model.eval().requires_grad_(False)
        student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=4))
        student.requires_grad_(True).eval()
        set_quant_state(student, enabled=True, update_ranges=True)
        with torch.no_grad():
            student(x)
        set_quant_state(student, update_ranges=False)
        opt = torch.optim.SGD(student.parameters(), lr=0.005, momentum=0.9, nesterov=True)

        def step():
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = F.cross_entropy(s, y) + kd_kl(s, t, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    else:
        teacher = model.eval().requires_grad_(False)
        stats, cfg = BNStatistics(teacher), HASTSynthConfig()
        pixels = (
            torch.randn(256, 1, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        )
        labels = torch.randint(0, 10, (256,))
        opt = torch.optim.Adam([pixels], lr=0.5)

        def step():
            loss = hast_synthesis_loss(teacher, stats, pixels, labels, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def run_workers(kind: str, n: int, threads: int, steps: int) -> float:
    """Start ``n`` worker processes at once; returns total steps / wall seconds of the slowest."""
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    seconds = [json.loads(p.communicate()[0])["seconds"] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench_threads: a {kind} worker failed")
    return n * steps / max(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--worker", choices=WORK)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps({"seconds": worker(args.worker, args.threads, args.steps)}))
        return
    c = args.cores
    print(f"{args.steps} timed steps per process; steps/s summed over processes")
    print(f"{'work':<11} {'1 x 1 thread':>13} {f'1 x {c} threads':>15} {f'{c} x 1 thread':>14} {'ratio':>6}")
    for kind in WORK:
        single = run_workers(kind, 1, 1, args.steps)
        wide = run_workers(kind, 1, c, args.steps)
        parallel = run_workers(kind, c, 1, args.steps)
        print(f"{kind:<11} {single:13.2f} {wide:15.2f} {parallel:14.2f} {parallel / wide:6.2f}", flush=True)


if __name__ == "__main__":
    main()
