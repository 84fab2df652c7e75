"""Benchmark: a job's start-up, from process start to its first training epoch, vs plain PyTorch's start-up.

Every Snakemake job is a fresh `python3 -m zsqpipe <stage>` process, so its fixed cost is paid ~30 times by
the main job. Measured in fresh processes (median of --reps):

- `import torch`, and `import torch` + creating an SGD optimizer: the floor any PyTorch training job pays
  (torch.optim's first optimizer imports TorchDynamo, ~1.5 s here; the plain baselines);
- `zsqpipe quantize --method real` up to the start of its first epoch (after quantizing the FP model and
  calibrating ranges on 2 batches), tracking off and tracking on (SQLite store, as the workflow's default);
- the tracking part alone: a fresh process that opens and closes a `Tracker.run` (the side process that logs
  it imports MLflow, creates and ends the run; the stage only starts it and waits for it at the end).

Needs a finished smoke run's data and FP model; one is made with Snakemake when --workdir has none:

    python benchmarks/bench_startup.py [--workdir /tmp/smoke] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_EPOCH = """
import os, sys, time
from zsqpipe.methods.base import QuantContext
def resumable(self, **state):
    print("FIRST_EPOCH", time.time(), flush=True)
    os._exit(0)
QuantContext.resumable = resumable
from zsqpipe.cli import main
sys.argv[0] = "zsqpipe"
main()
"""
PLAIN_TRAINING_JOB = "import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)"
TRACKER_START = """
import sys
from zsqpipe.tracking import Tracker
with Tracker.from_file(sys.argv[1]).run("bench-startup"):
    pass
"""
REAL = {"epochs": 1, "iters_per_epoch": 1, "batch_size": 64, "calib_batches": 2}


def timed(cmd: list[str], env: dict, marker: str | None = None) -> float:
    """Seconds from launching ``cmd`` until it prints ``marker <time.time()>`` (or until it exits)."""
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    end = time.time()
    if r.returncode != 0:
        sys.exit(f"bench_startup: error: {' '.join(cmd[:4])} failed:\n{r.stderr[-2000:]}")
    if marker is None:
        return end - t0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(marker))
    return float(line.split()[1]) - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zsqpipe-bench-startup"))
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    wd = Path(args.workdir)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    fp = wd / "results/models/fashion_mnist/resnet20/fp.pt"
    if not fp.is_file():
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(wd),
                        "--cores", "2", str(fp.relative_to(wd)), "--configfile", str(REPO / "config/smoke.yaml")],
                       check=True, cwd=REPO, env=env, capture_output=True)  # fmt: skip
    tracking = wd / "results/mlflow/tracking.json"
    out = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    quantize = [sys.executable, "-c", FIRST_EPOCH, "quantize", "--fp", str(fp), "--data",
                str(wd / "results/data/fashion_mnist/manifest.json"), "--method", "real", "--weight-bits", "4",
                "--act-bits", "4", "--method-params", json.dumps(REAL), "--out-model", str(out / "model.pt"),
                "--out-history", str(out / "history.json"), "--device", "cpu", "--threads", "1", "--no-resume"]  # fmt: skip
    cases = {
        "python -c 'import torch' (plain PyTorch)": ([sys.executable, "-c", "import torch"], None),
        "plain PyTorch training job: import torch + torch.optim.SGD(...)": (
            [sys.executable, "-c", PLAIN_TRAINING_JOB], None),
        "zsqpipe quantize to its first epoch, tracking off": (quantize, "FIRST_EPOCH"),
        "zsqpipe quantize to its first epoch, tracking on (SQLite)": (
            [*quantize, "--tracking", str(tracking)], "FIRST_EPOCH"),
        "Tracker.run opened and closed (worker: MLflow import, run), SQLite": (
            [sys.executable, "-c", TRACKER_START, str(tracking)], None),
    }  # fmt: skip
    base = None
    for name, (cmd, marker) in cases.items():
        secs = statistics.median(timed(cmd, env, marker) for _ in range(args.reps))
        base = base or secs
        print(f"{name:<60} {secs:6.2f} s   ({secs / base:.2f}x plain)")


if __name__ == "__main__":
    main()
