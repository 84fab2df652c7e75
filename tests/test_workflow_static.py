"""Checks that need no job to run: lint, env files, code versions, tracking fallbacks."""

import subprocess
import sys
from pathlib import Path

import yaml

from zsqpipe.codehash import code_version, import_closure
from zsqpipe.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent


def test_snakemake_lint_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr


def test_conda_envs_match_pyproject():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for env in ("environment.yml", "workflow/envs/zsqpipe.yaml"):
        pip = next(
            d["pip"] for d in yaml.safe_load((REPO / env).read_text())["dependencies"] if isinstance(d, dict)
        )
        assert [p for p in pip if not p.startswith("-e")] == deps, env


def test_registered_names_match_declared_names():
    """The torch-free name lists (zsqpipe.names: Snakefile wildcards, schema enums) are the registries' names."""
    from zsqpipe.data import DATASETS
    from zsqpipe.methods import get_method
    from zsqpipe.models import available_models
    from zsqpipe.names import ARCH_NAMES, DATASET_INPUT_SHAPES, DATASET_NAMES, METHOD_NAMES
    from zsqpipe.schema import build_schema

    assert set(DATASET_NAMES) == set(DATASETS) and set(ARCH_NAMES) <= set(available_models())
    infos = {n: DATASETS.get(n) for n in DATASETS}
    assert {n: (i.in_channels, i.image_size, i.image_size) for n, i in infos.items()} == DATASET_INPUT_SHAPES
    for name in METHOD_NAMES:
        assert get_method(name).name == name
    schema = build_schema()["properties"]  # and the built schema takes its enums from those lists
    assert schema["datasets"]["items"]["enum"] == list(DATASET_NAMES)
    assert list(schema["methods"]["properties"]) == list(METHOD_NAMES)


def test_code_version_follows_imports():
    assert "zsqpipe.quant" not in import_closure("zsqpipe.stages.fp_model")  # quantizer edits keep FP models
    closure = import_closure("zsqpipe.stages.quantize")
    assert "zsqpipe.quant.functional" in closure and "zsqpipe.tracking" not in closure
    assert "zsqpipe.methods.real" not in closure  # methods are hashed per cell
    assert "zsqpipe.schema" not in closure  # builds the workflow schema from every plug-in; reaches rules as params
    assert "zsqpipe.methods.ptq" not in import_closure("zsqpipe.methods.real")
    assert code_version("zsqpipe.stages.quantize", "zsqpipe.methods.real") != code_version(
        "zsqpipe.stages.quantize", "zsqpipe.methods.ptq"
    )


def test_disabled_tracker_is_a_noop(tmp_path):
    t = Tracker()
    with t.run("x"):
        t.log_params({"a": {"b": 1}})
        t.log_metrics({"m": 1.0}, step=0)
        t.log_artifact(tmp_path)


def test_tracking_server_down_does_not_fail_the_stage(capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    t = Tracker({"enabled": True, "tracking_uri": "http://127.0.0.1:9", "experiment_id": "0"})
    with t.run("x", {"k": "v"}):
        t.log_metrics({"m": 1.0})
    err = capfd.readouterr().err  # written by the tracking worker process
    assert "MLflow tracking failed" in err and err.count("MLflow tracking failed") == 1
    assert not t.enabled
