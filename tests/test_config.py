import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zsqpipe.config import FPConfig, from_dict, validate_config
from zsqpipe.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_default_and_smoke_configs_are_valid():
    for name in ("config.yaml", "smoke.yaml"):
        cfg = validate_config(yaml.safe_load((REPO / "config" / name).read_text()))
        assert cfg["tables"]["hast"]["methods"]
        assert cfg["methods"]["real"]["epochs"] >= 1


def test_defaults_fill_empty_config():
    cfg = validate_config({})
    assert cfg["datasets"] == ["fashion_mnist"] and cfg["quant"]["ema_mode"] == "correct"


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"bogus": 1}, "bogus"),
        ({"methods": {"real": {"lrr": 0.1}}}, "methods.real.lrr"),
        ({"fp_model": {"epochs": "three"}}, "fp_model.epochs"),
        ({"tables": {"hast": {"bits": ["w0a4"]}}}, "tables.hast.bits.0"),
        ({"quant": {"first_layer_bits": 0}}, "quant.first_layer_bits"),
        ({"tables": {"hast": {"methods": ["magic"]}}}, "tables.hast.methods.0"),
        ({"device": "tpu"}, "device"),
        ({"tracking": "yes"}, "tracking"),
    ],
)
def test_bad_config_one_line_naming_key(bad, key):
    with pytest.raises(ConfigError) as e:
        validate_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"'{key}'" in msg


def test_stage_config_dataclass_is_strict():
    with pytest.raises(ConfigError, match="fp_model.nope"):
        from_dict(FPConfig, {"nope": 1}, "fp_model")
    with pytest.raises(ConfigError, match="fp_model.epochs"):
        from_dict(FPConfig, {"epochs": 2.5}, "fp_model")
    assert from_dict(FPConfig, {"lr": 1}, "fp_model").lr == 1
    # optional fields are type-checked too (``int | None`` used to accept anything)
    with pytest.raises(ConfigError, match="fp_model.max_steps_per_epoch"):
        from_dict(FPConfig, {"max_steps_per_epoch": "yes"}, "fp_model")
    assert from_dict(FPConfig, {"max_steps_per_epoch": None}, "fp_model").max_steps_per_epoch is None
    assert from_dict(FPConfig, {"max_steps_per_epoch": 3}, "fp_model").max_steps_per_epoch == 3


@pytest.mark.parametrize(
    "override,key",
    [
        ("bogus_key: 1", "bogus_key"),
        ("tables: {hast: {bits: [w0a0]}}", "tables.hast.bits.0"),
        ("tables: {hast: {methods: [magic]}}", "tables.hast.methods.0"),
    ],
)
def test_snakemake_rejects_bad_config_in_one_line(tmp_path, override, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(override + "\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(REPO / "workflow" / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(cfg),
            "--workflow-profile",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "invalid config" in ln]
    assert len(lines) == 1 and f"'{key}'" in lines[0], r.stderr




def test_variants_are_checked_against_their_base_method():
    ok = validate_config({"variants": {"real_ce0": {"method": "real", "methods": {"ce_weight": 0.0}}}})
    assert ok["variants"]["real_ce0"]["methods"] == {"ce_weight": 0.0}
    cases = [
        ({"v": {"method": "real", "methods": {"cew": 0.0}}}, "variants.v.methods.cew"),
        ({"v": {"method": "real", "methods": {"ce_weight": "x"}}}, "variants.v.methods.ce_weight"),
        ({"v": {"method": "magic"}}, "variants.v.method"),
        ({"v": {"method": "ptq", "synthesis": {"iters": 1}}}, "variants.v.synthesis"),
    ]
    for variants, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config({"variants": variants})


def test_paper_configs_are_valid_over_the_default():
    """config/paper/*.yaml validate when layered over config/config.yaml, as `--configfile` does."""

    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    papers = sorted((REPO / "config" / "paper").glob("*.yaml"))
    names = {p.name for p in papers}
    assert {"cifar10_resnet20.yaml", "cifar100_resnet20.yaml", "imagenet_resnet18.yaml"} <= names
    assert {"imagenet_mobilenetv2.yaml", "cifar_resnet20_qat.yaml", "imagenet_qat.yaml"} <= names
    for path in papers:
        paper = yaml.safe_load(path.read_text())
        cfg = validate_config(merge(base, paper))
        if "tables" in paper:  # quantization paper configs: GPU budgets and published numbers to compare
            assert cfg["device"] == "cuda", path.name
            assert any(cfg["tables"][name]["paper"] for name in paper["tables"]), path.name


def test_miniature_gives_every_generator_calibration_the_same_steps():
    """docs/budget.md: the GDFQ-lineage calibration epochs get one generator budget in the CPU miniature —
    HAST's and IntraQ's calibration generator and GDFQ's and Qimera's warm-up epoch."""
    m = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))["methods"]
    steps = {
        "hast": m["hast"]["calib_iters"],
        "intraq": m["intraq"]["generator_steps"] if m["intraq"]["calibration"] == "generator" else None,
        "gdfq": m["gdfq"]["warmup_epochs"] * m["gdfq"]["warmup_iters"],
        "qimera": m["qimera"]["warmup_epochs"] * m["qimera"]["warmup_iters"],
    }
    assert set(steps.values()) == {200}, steps


def test_relative_checkpoint_resolves_from_the_working_directory_then_the_checkout(tmp_path):
    """fp_model.checkpoints: a relative path names the working directory's file when there is one, else the
    checkout's (the shipped checkpoints/), else stays in the working directory (the config check then names it)."""
    from zsqpipe.config import resolve_checkpoint

    work, repo = tmp_path / "work", tmp_path / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    (repo / "checkpoints" / "fp.pt").write_bytes(b"shipped")
    (work / "checkpoints").mkdir(parents=True)
    assert resolve_checkpoint("checkpoints/fp.pt", work, repo) == repo / "checkpoints" / "fp.pt"
    assert resolve_checkpoint("checkpoints/fp.pt", work) == work / "checkpoints" / "fp.pt"  # no checkout given
    (work / "checkpoints" / "fp.pt").write_bytes(b"local")
    assert resolve_checkpoint("checkpoints/fp.pt", work, repo) == work / "checkpoints" / "fp.pt"
    assert resolve_checkpoint("missing.pt", work, repo) == work / "missing.pt"
    absolute = repo / "checkpoints" / "fp.pt"
    assert resolve_checkpoint(absolute, work, repo) == absolute
