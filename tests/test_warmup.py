"""Generator warm-ups recorded once (``generator-warmup``) and replayed by every cell give the same student as
a cell that trains its generator itself (zsqpipe/warmups.py, zsqpipe/zsq/warmup.py, zsqpipe/stages/warmup.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from method_helpers import quant_context

from zsqpipe.config import validate_config
from zsqpipe.data import forbid_real_data
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.methods import get_method
from zsqpipe.quant import QuantConfig
from zsqpipe.warmups import CALIBRATION_FIELDS, GENERATOR_QAT_FIELDS, warmup_spec, warmup_tag
from zsqpipe.zsq.calibration import CalibrationGenerator, calibrate_with_generator, calibration_generator_run
from zsqpipe.zsq.warmup import WarmupRecord, WarmupRecorder

SIZE = 8


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def _record(method, ctx) -> WarmupRecord:
    """What the generator_warmup job does, from the cell's RNG state: the method rebuilt from its warm-up spec
    alone (every other setting at its default), run on the teacher alone (the cell's RNG left as it was)."""
    spec = method.warmup_spec()
    recorder = WarmupRecorder()
    teacher_ctx = SimpleNamespace(teacher=ctx.teacher, seed=ctx.seed, device=ctx.device,
                                  num_classes=ctx.num_classes, input_shape=ctx.input_shape)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        settings = {k: v for k, v in spec.items() if k != "kind"}
        state = get_method(spec["kind"])(settings).record_warmup(teacher_ctx, recorder)
    return recorder.record(spec, ctx.seed, "sha", state)


@pytest.mark.parametrize("name", ["gdfq", "qimera"])
@pytest.mark.parametrize("bits", [(4, 4), (3, 3)])
def test_replayed_warmup_gives_the_cell_it_would_have_trained(name, bits):
    # student-side settings differ from their defaults: the recording (built from the spec alone) must not
    # depend on them
    cfg = {"epochs": 3, "warmup_epochs": 1, "warmup_iters": 4, "iters_per_epoch": 2, "batch_size": 4,
           "lr": 0.001, "kd_temperature": 4.0, "ce_weight": 0.5}  # fmt: skip
    quant = QuantConfig(weight_bits=bits[0], act_bits=bits[1])
    runs = []
    for replay in (False, True):
        ctx, history = quant_context(seed=3, size=SIZE, quant=quant)
        method = get_method(name)(cfg)
        if replay:
            ctx.warmup = _record(method, ctx)
        with forbid_real_data("warm-up test"):
            method.run(ctx)
        runs.append((_state(ctx.student), _state(method.generator), history))
    (s_live, g_live, h_live), (s_replay, g_replay, h_replay) = runs
    assert all(torch.isfinite(v).all() for v in s_live.values())
    _assert_same_state(s_live, s_replay)
    _assert_same_state(g_live, g_replay)
    assert h_live == h_replay  # losses, lr and generator loss of every epoch, the warm-up's included


@pytest.mark.parametrize("name", ["hast", "intraq"])
def test_replayed_calibration_sets_the_same_ranges(name):
    method = get_method(name)({})
    spec = method.warmup_spec()
    assert spec["kind"] == "calib"
    students = []
    for replay in (False, True):
        ctx, _ = quant_context(seed=1, size=SIZE)
        gen = CalibrationGenerator(steps=6, batch_size=4)
        args = (ctx.student, ctx.teacher, 10, (1, SIZE, SIZE), gen, ctx.seed, ctx.device)
        record = None
        if replay:
            recorder = WarmupRecorder()
            with torch.random.fork_rng(devices=[]):
                for x, y, loss in calibration_generator_run(ctx.teacher, 10, (1, SIZE, SIZE), gen, ctx.seed,
                                                            ctx.device, recorder=recorder):  # fmt: skip
                    recorder.add(x, y, loss)
            record = recorder.record(spec, ctx.seed, "sha")
        loss = calibrate_with_generator(*args, log=lambda *_: None, warmup=record)
        students.append((_state(ctx.student), loss, torch.get_rng_state()))
    _assert_same_state(students[0][0], students[1][0])
    assert students[0][1] == students[1][1]
    assert torch.equal(students[0][2], students[1][2])  # later random draws of the cell are the same too


def test_a_cell_whose_rng_differs_from_the_warmups_is_refused():
    ctx, _ = quant_context(seed=3, size=SIZE)
    method = get_method("gdfq")({"epochs": 2, "warmup_iters": 2, "iters_per_epoch": 1, "batch_size": 4})
    ctx.warmup = _record(method, ctx)
    torch.rand(1)  # the cell drew a random number the warm-up job did not
    with pytest.raises(IntegrityError, match="global RNG differs"):
        method.run(ctx)


def test_record_round_trip_and_checks(tmp_path):
    spec = {"kind": "calib", "steps": 2, "batch_size": 3, "lr": 1e-3, "latent_dim": 100, "bns_weight": 0.1}
    recorder = WarmupRecorder()
    with recorder.generator_init():
        pass
    for i in range(2):
        recorder.add(torch.full((3, 1, 4, 4), float(i)), torch.arange(3), 0.5 + i)
    recorder.record(spec, 7, "abc").save(tmp_path / "w.pt")
    rec = WarmupRecord.load(tmp_path / "w.pt", spec, "abc", 7)
    x, y, loss = rec.batch(1, "cpu")
    assert x.shape == (3, 1, 4, 4) and float(x.max()) == 1.0 and loss == 1.5 and y.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="steps=2.*steps=5"):
        WarmupRecord.load(tmp_path / "w.pt", {**spec, "steps": 5}, "abc", 7)
    with pytest.raises(IntegrityError, match="different FP checkpoint"):
        WarmupRecord.load(tmp_path / "w.pt", spec, "other", 7)
    with pytest.raises(IntegrityError, match="seed 7, expected 8"):
        WarmupRecord.load(tmp_path / "w.pt", spec, "abc", 8)


def test_specs_from_the_workflow_config_equal_the_methods_own():
    """The Snakefile derives each warm-up's spec from the validated config without torch; the quantize job
    checks the record against the spec its method computes: both must agree for every shipped method."""
    cfg = validate_config(yaml.safe_load(Path("config/config.yaml").read_text()))
    for name in [*GENERATOR_QAT_FIELDS, *CALIBRATION_FIELDS]:
        from_config = warmup_spec(name, cfg["methods"][name])
        assert from_config == get_method(name)(cfg["methods"][name]).warmup_spec()
    assert warmup_spec("zeroq", cfg["methods"]["zeroq"]) is None
    assert warmup_spec("intraq", {**cfg["methods"]["intraq"], "calibration": "shards"}) is None
    # HAST and IntraQ at their defaults calibrate on the same generator run: one warm-up for both
    assert warmup_tag(warmup_spec("hast", cfg["methods"]["hast"])) == warmup_tag(
        warmup_spec("intraq", cfg["methods"]["intraq"])
    )
    # a student-side setting does not change the warm-up; a generator setting does
    gdfq = cfg["methods"]["gdfq"]
    assert warmup_spec("gdfq", {**gdfq, "kd_temperature": 4.0}) == warmup_spec("gdfq", gdfq)
    assert warmup_spec("gdfq", {**gdfq, "iters_per_epoch": 100}) != warmup_spec("gdfq", gdfq)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data manifest, FP model and synthetic shards on the tiny Fashion-MNIST fixture."""
    from conftest import hidden_debian_data, prepare_fp_and_shards

    tmp = tmp_path_factory.mktemp("warmup")
    with hidden_debian_data(tmp):
        prepare_fp_and_shards(tmp, {"max_steps_per_epoch": 2, "batch_size": 32, "lr": 0.05}, "hast")
        yield tmp


@pytest.mark.parametrize(
    ("method", "cfg"),
    [("gdfq", {"epochs": 3, "warmup_epochs": 1, "warmup_iters": 3, "iters_per_epoch": 2, "batch_size": 8}),
     ("hast", {"epochs": 2, "iters_per_epoch": 2, "batch_size": 16, "calib_iters": 3, "calib_batch_size": 4})],
)  # fmt: skip
def test_stage_warmup_then_quantize_equals_quantize_alone(prepared, tmp_path, method, cfg):
    """The workflow's path (generator-warmup job, then quantize --warmup in another process, here a resumed
    one) gives the bit-identical model and history of a quantize job that trains the generator itself;
    a record made for other settings is refused."""
    from test_resume import run_interrupted, without_times

    from zsqpipe.io import load_checkpoint
    from zsqpipe.job import Job
    from zsqpipe.stages.quantize import run_quantize
    from zsqpipe.stages.warmup import run_generator_warmup

    spec = get_method(method)(cfg).warmup_spec()
    summary = run_generator_warmup(prepared / "fp.pt", spec, 0, tmp_path / "w.pt", Job.quiet(device="cpu", threads=1))
    assert summary["steps"] == 3

    def run(out, warmup, resume_root=None, c=cfg):
        samples = prepared / "samples" if method == "hast" else None
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", method, c, QuantConfig(4, 4), 0,
                            out / "model.pt", out / "history.json", samples=samples, warmup=warmup,
                            job=Job("cpu", 1, log=lambda _m: None, resume_root=resume_root))  # fmt: skip

    ref = run(tmp_path / "live", None)
    run_interrupted(lambda: run(tmp_path / "replay", tmp_path / "w.pt", tmp_path / ".resume"), after_epoch=1)
    res = run(tmp_path / "replay", tmp_path / "w.pt", tmp_path / ".resume")
    assert res["resumed_from_epoch"] == 2 or method == "hast"  # hast's 2 epochs: killed after the last one
    assert without_times(res["history"]) == without_times(ref["history"])
    a = load_checkpoint(tmp_path / "live" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "replay" / "model.pt")["state_dict"]
    _assert_same_state(a, b)
    key = "warmup_iters" if method == "gdfq" else "calib_iters"
    with pytest.raises(ConfigError, match=f"warm-up recorded with .*{3}"):
        run(tmp_path / "other", tmp_path / "w.pt", c={**cfg, key: 4})


def test_inputs_seed_fixes_samples_and_calibration_while_the_fine_tuning_seed_varies(prepared, tmp_path):
    """quantize --inputs-seed (variants.<v>.inputs_seed): a seed-1 cell reads the seed-0 samples and range
    calibration record (or GDFQ warm-up); its fine-tuning still draws with seed 1."""
    from test_resume import without_times

    from zsqpipe.job import Job
    from zsqpipe.stages.quantize import run_quantize
    from zsqpipe.stages.warmup import run_generator_warmup

    cfg = {"epochs": 2, "iters_per_epoch": 2, "batch_size": 16, "calib_iters": 3, "calib_batch_size": 4}
    job = Job.quiet(device="cpu", threads=1)
    run_generator_warmup(prepared / "fp.pt", get_method("hast")(cfg).warmup_spec(), 0, tmp_path / "w0.pt", job)

    def run(name, seed, inputs_seed=None, method="hast", c=cfg, warmup=tmp_path / "w0.pt"):
        out = tmp_path / name
        samples = prepared / "samples" if method == "hast" else None
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", method, c, QuantConfig(4, 4), seed,
                            out / "model.pt", out / "history.json", samples=samples, warmup=warmup,
                            job=Job("cpu", 1, log=lambda _m: None), inputs_seed=inputs_seed)  # fmt: skip

    with pytest.raises(IntegrityError, match="synthesized with seed 0, expected 1"):
        run("plain1", 1)
    with pytest.raises(ConfigError, match="--inputs-seed: method 'hast' trains its generator in the cell"):
        run("nowarmup1", 1, inputs_seed=0, warmup=None)
    own = run("own0", 0)
    assert "inputs_seed" not in own
    assert without_times(run("same0", 0, inputs_seed=0)["history"]) == without_times(own["history"])
    fixed = run("fixed1", 1, inputs_seed=0)
    assert fixed["inputs_seed"] == 0 and fixed["seed"] == 1
    assert [h["train_loss"] for h in fixed["history"]] != [h["train_loss"] for h in own["history"]]
    fixed2 = run("fixed2", 2, inputs_seed=0)
    assert [h["train_loss"] for h in fixed2["history"]] != [h["train_loss"] for h in fixed["history"]]
    # GDFQ: the seed-1 cell's warm-up epoch (ranges, generator) is seed 0's; its fine-tuning noise is its own
    gdfq = {"epochs": 2, "warmup_epochs": 1, "warmup_iters": 2, "iters_per_epoch": 2, "batch_size": 8}
    run_generator_warmup(prepared / "fp.pt", get_method("gdfq")(gdfq).warmup_spec(), 0, tmp_path / "g0.pt", job)
    g_own = run("gdfq0", 0, method="gdfq", c=gdfq, warmup=tmp_path / "g0.pt")["history"]
    g_fixed = run("gdfq1", 1, inputs_seed=0, method="gdfq", c=gdfq, warmup=tmp_path / "g0.pt")["history"]
    g_fixed2 = run("gdfq2", 2, inputs_seed=0, method="gdfq", c=gdfq, warmup=tmp_path / "g0.pt")["history"]
    assert without_times(g_fixed[:1]) == without_times(g_own[:1]) == without_times(g_fixed2[:1])
    assert len({g_own[1]["train_loss"], g_fixed[1]["train_loss"], g_fixed2[1]["train_loss"]}) == 3
    with pytest.raises(IntegrityError, match="recorded for seed 0, expected 1"):
        run("gdfq1b", 1, method="gdfq", c=gdfq, warmup=tmp_path / "g0.pt")


def test_samples_seed_and_warmup_seed_fix_one_input_each(prepared, tmp_path):
    """quantize --samples-seed / --warmup-seed (variants.<v>.samples_seed / warmup_seed): a seed-1 cell holds one
    input at seed 0 and reads the other of its own seed; both at 0 is --inputs-seed 0."""
    from test_resume import without_times

    from zsqpipe.job import Job
    from zsqpipe.stages.quantize import run_quantize
    from zsqpipe.stages.warmup import run_generator_warmup

    cfg = {"epochs": 2, "iters_per_epoch": 2, "batch_size": 16, "calib_iters": 3, "calib_batch_size": 4}
    spec = get_method("hast")(cfg).warmup_spec()
    for seed in (0, 1):
        run_generator_warmup(prepared / "fp.pt", spec, seed, tmp_path / f"w{seed}.pt", Job.quiet(device="cpu", threads=1))

    def run(name, warmup, **seeds):
        out = tmp_path / name
        return run_quantize(prepared / "fp.pt", prepared / "manifest.json", "hast", cfg, QuantConfig(4, 4), 1,
                            out / "model.pt", out / "history.json", samples=prepared / "samples", warmup=warmup,
                            job=Job("cpu", 1, log=lambda _m: None), **seeds)  # fmt: skip

    split = run("samples0", tmp_path / "w1.pt", samples_seed=0)  # the prepared samples are seed 0's
    assert split["samples_seed"] == 0 and "warmup_seed" not in split and "inputs_seed" not in split
    both = run("both0", tmp_path / "w0.pt", samples_seed=0, warmup_seed=0)
    assert both["samples_seed"] == 0 and both["warmup_seed"] == 0
    assert without_times(both["history"]) == without_times(run("inputs0", tmp_path / "w0.pt", inputs_seed=0)["history"])
    assert [h["train_loss"] for h in split["history"]] != [h["train_loss"] for h in both["history"]]
    with pytest.raises(IntegrityError, match="recorded for seed 0, expected 1"):
        run("warmup_not_fixed", tmp_path / "w0.pt", samples_seed=0)
    with pytest.raises(IntegrityError, match="synthesized with seed 0, expected 1"):
        run("samples_not_fixed", tmp_path / "w0.pt", warmup_seed=0)
    with pytest.raises(IntegrityError, match="synthesized with seed 0, expected 2"):
        run("samples_seed_wins", tmp_path / "w0.pt", inputs_seed=0, samples_seed=2)
