"""Benchmark: wall time of a whole Snakemake target, and of each rule's jobs (from their `benchmark:` files).

Where the README's workflow timings come from (the tests assert behaviour, never time). Runs the workflow in a
fresh working directory (nothing reused), then prints the total wall time and, per rule, the number of jobs
and their wall / CPU seconds (sum, mean, max) as Snakemake's `benchmark:` directive recorded them.

    python benchmarks/bench_workflow.py                                   # the smoke DAG (tests' config)
    python benchmarks/bench_workflow.py --configfile config/main.yaml     # the README main job (`make run`)
    python benchmarks/bench_workflow.py --configfile config/main.yaml --workdir /tmp/main --json main.json
    python benchmarks/bench_workflow.py --configfile config/main.yaml config/main_w3a3.yaml   # W3A3 only

Note the load of the machine with the result: a busy machine is slower (a second job on 2 cores ~1.3-2x).
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
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def rule_times(workdir: Path) -> dict[str, dict[str, float]]:
    """Per rule: jobs, wall and CPU seconds (sum, mean, max) from results/benchmarks/<rule>/**.tsv."""
    walls, cpus = defaultdict(list), defaultdict(list)
    root = workdir / "results" / "benchmarks"
    for tsv in sorted(root.rglob("*.tsv")):
        rule = tsv.relative_to(root).parts[0].removesuffix(".tsv")
        row = pd.read_csv(tsv, sep="\t").iloc[-1]
        walls[rule].append(float(row["s"]))
        cpus[rule].append(float(row.get("cpu_time", float("nan"))))
    return {
        rule: {
            "jobs": len(w),
            "wall_s_sum": sum(w),
            "wall_s_mean": statistics.fmean(w),
            "wall_s_max": max(w),
            "cpu_s_sum": sum(cpus[rule]),
        }
        for rule, w in walls.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configfile", nargs="+", default=[str(REPO / "config" / "smoke.yaml")],
                    help="one or more config files, later ones overlaying earlier ones (as snakemake's)")
    ap.add_argument("--target", default="results/tables/hast.csv")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", help="run here (must not hold results yet); default: a temp folder")
    ap.add_argument("--json", help="also write the measurements to this file")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-workflow-"))
    if (workdir / "results").exists():
        sys.exit(f"bench_workflow: error: {workdir / 'results'} exists; give an empty --workdir")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--cores", str(args.cores), args.target, "--configfile", *(str(Path(c).resolve()) for c in args.configfile)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_workflow: error: snakemake failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rules = rule_times(workdir)
    print(f"{' + '.join(Path(c).name for c in args.configfile)} -> {args.target}: {wall:.1f} s wall ({wall / 60:.1f} min), "
          f"{sum(v['jobs'] for v in rules.values())} jobs, --cores {args.cores}, load before {load:.2f}")  # fmt: skip
    print(f"{'rule':<16} {'jobs':>4} {'wall sum':>9} {'mean':>7} {'max':>7} {'cpu sum':>8}")
    for rule, v in sorted(rules.items(), key=lambda kv: -kv[1]["wall_s_sum"]):
        print(f"{rule:<16} {v['jobs']:>4} {v['wall_s_sum']:>9.1f} {v['wall_s_mean']:>7.1f} "
              f"{v['wall_s_max']:>7.1f} {v['cpu_s_sum']:>8.1f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": args.configfile,
                    "target": args.target,
                    "cores": args.cores,
                    "load": load,
                    "wall_s": wall,
                    "rules": rules,
                    "workdir": str(workdir),
                },
                indent=2,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()
