"""Run the Snakemake workflow from tests, in an isolated working directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, base: str = "smoke.yaml", **overrides) -> Path:
    cfg = yaml.safe_load((REPO / "config" / base).read_text())
    for dotted, value in overrides.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(workdir: Path, configfile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), *args]  # fmt: skip


def snakemake(workdir: Path, configfile: Path, *args: str, timeout: int = 900, check: bool = True):
    cmd = snakemake_cmd(workdir, configfile, *args)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        )
    return r


def planned_jobs(workdir: Path, configfile: Path, *targets: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    r = snakemake(workdir, configfile, "-n", *targets)
    jobs, current = [], None
    for line in r.stdout.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            if current:
                jobs.append(current)
            current = (m.group(1), "")
            continue
        m = re.match(r"^\s+wildcards: (.*)$", line)
        if m and current:
            current = (current[0], m.group(1))
    if current:
        jobs.append(current)
    return [j for j in jobs if j[0] != "all"]
