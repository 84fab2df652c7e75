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
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
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


def planned(workdir: Path, configfile: Path, *targets: str) -> dict[tuple[str, str], dict[str, str]]:
    """Every job a dry run (``-n -p``) would execute, in order: ``{(rule, wildcards): {"output", "shell"}}``
    (the rule ``all`` left out)."""
    r = snakemake(workdir, configfile, "-n", "-p", *targets)
    jobs: list[list] = []  # [rule, wildcards, {"output", "shell"}] per job
    for line in r.stdout.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            jobs.append([m.group(1), "", {"output": "", "shell": ""}])
        elif jobs and (m := re.match(r"^\s+(wildcards|output): (.*)$", line)):
            if m.group(1) == "wildcards":
                jobs[-1][1] = m.group(2)
            else:
                jobs[-1][2]["output"] = m.group(2)
        elif jobs and line.startswith("Shell command: "):
            jobs[-1][2]["shell"] = line.removeprefix("Shell command: ")
    return {(rule, w): info for rule, w, info in jobs if rule != "all"}


def planned_jobs(workdir: Path, configfile: Path, *targets: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job a dry run would execute."""
    return list(planned(workdir, configfile, *targets))
