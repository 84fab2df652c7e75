"""Integer deployment: QDQ ONNX export of fake-quantized models, run in onnxruntime (docs/deploy.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

pytest.importorskip("onnxruntime")

from zsqpipe.cli import cli  # noqa: E402
from zsqpipe.deploy import ExportError, PixelInput, export_float_onnx, export_onnx  # noqa: E402
from zsqpipe.deploy.runtime import kernel_counts, session  # noqa: E402
from zsqpipe.io import save_checkpoint  # noqa: E402
from zsqpipe.models import create_model  # noqa: E402
from zsqpipe.quant import QuantConfig, quantize_model, set_quant_state  # noqa: E402
from zsqpipe.quant.modules import QuantAct  # noqa: E402


class Stack(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, conv-BN + identity -> ReLU, pool, linear: every export path once."""

    def __init__(self, c: int = 8, in_channels: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(c, c, 3, stride=1, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(x)))
        y = self.relu3(self.bn3(self.conv3(y)) + x)
        return self.fc(self.pool(y).flatten(1))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics, some gamma < 0 (folding must flip those channels' integers)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 2.7 - 1.2)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)


def calibrated(model: nn.Module, bits: int, shape=(1, 28, 28), **quant) -> nn.Module:
    torch.manual_seed(0)
    randomise_bn(model)
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, **quant))
    model.eval()
    set_quant_state(model, update_ranges=True)
    with torch.no_grad():
        model(torch.randn(32, *shape, generator=torch.Generator().manual_seed(1)))
    set_quant_state(model, update_ranges=False)
    return model


def act_levels(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each activation quantizer's output, in integer levels (output / its step)."""
    from zsqpipe.deploy.onnx_parts import act_grid

    out, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantAct):
            step = act_grid(name, m.quantizer)[1]
            hooks.append(m.register_forward_hook(lambda _m, _i, o, n=name, s=step: out.__setitem__(n, torch.round(o / s))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


FMNIST = PixelInput((0.2860,), (0.3530,))


def pixel_batch(n: int, pixels: PixelInput = FMNIST, size: int = 28, seed: int = 2) -> torch.Tensor:
    """Normalized 8-bit images, as the data loaders feed them: (p / 255 - mean) / std."""
    c = len(pixels.mean)
    p = torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (pixels.mean, pixels.std))
    return (p.float() / 255.0 - mean) / std


def run_onnx(path, x: torch.Tensor, extra: list[str] = (), level: str = "extended"):
    import onnx

    if extra:  # expose intermediate integer tensors as graph outputs
        m = onnx.load(str(path))
        for name in extra:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
        path = path.with_name("debug.onnx")
        onnx.save(m, str(path))
    sess = session(path, 1, level=level)
    return sess.run(None, {"input": x.numpy()})


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_exact_export_matches_fake_quant_on_the_integer_grid(tmp_path, bits):
    """Every activation quantizer's integer levels and the logits of the ONNX model equal the fake-quant ones;
    the first conv runs as ConvInteger on the input's 8-bit pixels."""
    model = calibrated(Stack(), bits)
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, (1, 28, 28), path, pixels=FMNIST)
    x = pixel_batch(64)
    levels = act_levels(model, x)
    names = [f"{n.replace('.', '_')}_qclip" for n in levels]
    outs = run_onnx(path, x, names)
    with torch.no_grad():
        ref = model(x).numpy()
    for (name, lv), got in zip(levels.items(), outs[1:], strict=True):
        diff = np.abs(lv.numpy().astype(np.int64) - got.astype(np.int64))
        # the integer sums are exact; the float requantization (int32 * s_x s_w + bias in float32) and torch's
        # float conv round differently, and at 8 bits (255 levels) a value can sit within that rounding of a level
        # boundary (measured: 1 of 401,408 values of relu2, one level, carried to relu3)
        assert diff.max() <= (0 if bits < 8 else 1), name
        assert diff.astype(bool).mean() < 1e-4, name
    np.testing.assert_allclose(outs[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    kernels = {lay.name: lay.kernel for lay in rep.layers}
    assert kernels == {"conv1": "ConvInteger", "conv2": "ConvInteger", "conv3": "ConvInteger", "fc": "ConvInteger"}
    assert rep.act_quantizers == 3
    assert kernel_counts(path)["float_kernels"] == 0  # the padding-offset conv is folded away at load time


def test_without_pixel_input_the_first_conv_stays_float(tmp_path):
    model = calibrated(Stack(), 4)
    rep = export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    assert rep.layers[0].kernel == "float" and rep.layers[0].reason == "input not quantized"
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(2))  # any float input then
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x)[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert kernel_counts(tmp_path / "m.onnx")["float_kernels"] == 1


def test_rgb_pixel_input_runs_one_conv_integer_per_channel_step(tmp_path):
    """CIFAR's per-channel std gives three pixel steps: three ConvIntegers summed in float, exact otherwise."""
    rgb = PixelInput((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    model = calibrated(Stack(in_channels=3), 4, shape=(3, 16, 16))
    rep = export_onnx(model, (3, 16, 16), tmp_path / "m.onnx", pixels=rgb)
    x = pixel_batch(32, rgb, size=16)
    levels = act_levels(model, x)
    outs = run_onnx(tmp_path / "m.onnx", x, [f"{n.replace('.', '_')}_qclip" for n in levels])
    for lv, got in zip(levels.values(), outs[1:], strict=True):
        assert np.array_equal(lv.numpy().astype(np.int64), got.astype(np.int64))
    assert rep.layers[0].kernel == "ConvInteger"
    counts = kernel_counts(tmp_path / "m.onnx")
    assert counts["ConvInteger"] == 3 + 3 and counts["float_kernels"] == 0  # conv1 x 3 channel steps, conv2, conv3, fc
    with pytest.raises(ExportError, match="^conv1: PixelInput has 1 channels, the layer reads 3"):
        export_onnx(model, (3, 16, 16), tmp_path / "x.onnx", pixels=FMNIST)


def test_bn_folding_flips_integers_where_gamma_is_negative(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = calibrated(Stack(), 4)
    export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    levels = model.conv2.weight_quantizer.levels(model.conv2.weight.detach()).numpy()
    sign = np.sign(model.bn2.weight.detach().numpy())
    assert (sign < 0).any() and (sign > 0).any()
    np.testing.assert_array_equal(inits["conv2_weight_q"], levels * sign[:, None, None, None])


def test_qlinear_mode_fuses_into_qlinearconv_and_stays_close(tmp_path):
    model = calibrated(Stack(), 6)  # 8-bit asymmetric levels exceed int8: those layers stay ConvInteger
    path = tmp_path / "q.onnx"
    rep = export_onnx(model, (1, 28, 28), path, mode="qlinear")
    assert {lay.name: lay.kernel for lay in rep.layers}["conv2"] == "QLinearConv"
    counts = kernel_counts(path)
    assert counts["QLinearConv"] == 1 and counts["ConvInteger"] == 2 and counts["integer_kernels"] == 3  # + conv3, fc
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_onnx(path, x, level="all")[0]
    # int32 bias on the step s_x * s_w / k: at 6 bits a flipped level moves a logit by far less than 1 %
    assert np.abs(out - ref).max() < 0.01 * np.abs(ref).max()


def test_float_export_is_the_latent_float_model(tmp_path):
    model = calibrated(Stack(), 4)
    rep = export_float_onnx(model, (1, 28, 28), tmp_path / "f.onnx")
    assert {lay.kernel for lay in rep.layers} == {"float"} and rep.act_quantizers == 0
    x = torch.randn(16, 1, 28, 28)
    set_quant_state(model, enabled=False)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "f.onnx", x)[0], ref, rtol=1e-4, atol=1e-5)
    assert kernel_counts(tmp_path / "f.onnx")["integer_kernels"] == 0


@pytest.mark.parametrize(
    ("arch", "quant"),
    [
        ("resnet20", {}),
        ("resnet20", {"weight_quantizer": "lsq", "act_quantizer": "lsq"}),
        ("mobilenet_v2_small", {}),
        ("resnet18", {"weight_quantizer": "lsq_tensor", "act_quantizer": "ema_minmax", "last_layer_bits": 32}),
    ],
)
def test_model_zoo_exports_and_predicts_as_fake_quant(tmp_path, arch, quant):
    model = calibrated(create_model(arch, num_classes=10, in_channels=1, image_size=28), 4, **quant)
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, (1, 28, 28), path, pixels=FMNIST)
    x = pixel_batch(32, seed=3)
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_onnx(path, x, level="all")[0]
    # most rows equal up to float rounding: the float requantization and torch's float conv round differently
    # (summation orders depend on torch's kernel and thread count), which can put a value on the other side of a
    # level boundary, and in a random-weight deep net one flipped level spreads to many (measured: 0-4 of 32
    # rows); the integer sums are exact (the stack above, and the main job's trained cells)
    close = np.isclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max()).all(1)
    assert close.mean() >= 0.75 and (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    counts = kernel_counts(path)
    quantized_input = [lay for lay in rep.layers if lay.kernel != "float"]
    assert counts["integer_kernels"] == len(quantized_input) > 0
    assert counts["float_kernels"] == len(rep.float_layers)
    assert rep.layers[0].kernel == "ConvInteger"  # the first conv reads the image's 8-bit pixels
    if arch == "mobilenet_v2_small":  # expansion convs read the block's float residual sum
        assert any(lay.reason == "input not quantized" for lay in rep.float_layers[1:])
    if "last_layer_bits" not in quant:  # the classifier on the pooled integer map
        assert rep.layers[-1].kernel == "ConvInteger"
    if "last_layer_bits" in quant:
        assert rep.layers[-1].reason == "weight bits 32"


def test_unexportable_models_fail_with_one_line_naming_the_layer(tmp_path):
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3), nn.GELU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    model = Gelu()
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))
    with pytest.raises(ExportError, match="^act: GELU cannot be exported"):
        export_onnx(model.eval(), (1, 8, 8), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()

    class LoneBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(self.bn(x)).flatten(1)

    model = LoneBN()
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4))
    with pytest.raises(ExportError, match="^bn: BatchNorm that does not follow a conv"):
        export_onnx(model.eval(), (1, 8, 8), tmp_path / "b.onnx")

    model = calibrated(Stack(), 4)
    model.relu1[1].quantizer._has_range = False  # never calibrated
    with pytest.raises(ExportError, match=r"^relu1\.1: activation quantizer has no calibrated range"):
        export_onnx(model, (1, 28, 28), tmp_path / "c.onnx")


def _quantized_checkpoint(path, bits: int = 4) -> dict:
    model = calibrated(create_model("resnet20", num_classes=10, in_channels=1, image_size=28), bits)
    ckpt = {"arch": "resnet20", "num_classes": 10, "in_channels": 1, "image_size": 28,
            "state_dict": model.state_dict(), "quant": QuantConfig(weight_bits=bits, act_bits=bits).to_dict()}  # fmt: skip
    save_checkpoint(path, ckpt)
    return ckpt


def test_export_and_deploy_eval_commands(tmp_path, no_debian_data):
    from tests.conftest import prepare_fixture_data

    manifest = prepare_fixture_data(tmp_path)
    _quantized_checkpoint(tmp_path / "model.pt")
    r = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "m.onnx"),
                                 "--out-fp32", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "export.json"),
                                 "--dataset", "fashion_mnist"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "export.json").read_text())
    assert rep["kernels"]["integer_kernels"] == 22 and rep["kernels"]["float_kernels"] == 0  # ResNet-20: 21 convs + fc
    assert rep["onnx_bytes"] < rep["onnx_fp32_bytes"] / 2
    cell = {"dataset": "fashion_mnist", "arch": "resnet20", "method": "real", "weight_bits": 4, "act_bits": 4, "seed": 0}
    r = CliRunner().invoke(cli, ["deploy-eval", "--model", str(tmp_path / "model.pt"), "--onnx", str(tmp_path / "m.onnx"),
                                 "--data", str(manifest), "--cell", json.dumps(cell), "--out", str(tmp_path / "d.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["n"] == 120 and d["disagree_pct"] == 0.0 and d["int_top1"] == d["fake_top1"]

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(cli, ["export", "--model", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "x.onnx"),
                                 "--out-fp32", str(tmp_path / "y.onnx"), "--report", str(tmp_path / "x.json")])  # fmt: skip
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "bad.pt" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_deploy_table_from_cells(tmp_path):
    from zsqpipe.stages.deploy import run_deploy_table

    deploys, exports = [], []
    for seed, (fake, integer) in enumerate([(80.0, 80.0), (82.0, 81.5)]):
        d = {"dataset": "fashion_mnist", "arch": "resnet20", "method": "hast", "weight_bits": 3, "act_bits": 3,
             "seed": seed, "n": 10000, "fake_top1": fake, "int_top1": integer, "disagree_pct": 1.0 * seed,
             "onnx_bytes": 300 * 1024}  # fmt: skip
        e = {"mode": "exact", "kernels": {"integer_kernels": 18, "float_kernels": 2}, "onnx_fp32_bytes": 1000 * 1024}
        deploys.append(tmp_path / f"d{seed}.json")
        exports.append(tmp_path / f"e{seed}.json")
        deploys[-1].write_text(json.dumps(d))
        exports[-1].write_text(json.dumps(e))
    lat = {"dataset": "fashion_mnist", "arch": "resnet20", "weight_bits": 3, "act_bits": 3,
           "latency": [{"batch": 256, "threads": 1, "int_onnx_ms": 30.0, "fp32_onnx_ms": 20.0, "torch_fake_ms": 40.0}]}  # fmt: skip
    (tmp_path / "lat.json").write_text(json.dumps(lat))
    table = run_deploy_table(deploys, exports, [tmp_path / "lat.json"], tmp_path / "t.csv", tmp_path / "t.md")
    row = table.iloc[0]
    assert row["int_top1_mean"] == pytest.approx(80.75) and row["abs_int_minus_fake_max"] == pytest.approx(0.5)
    assert row["disagree_pct_mean"] == pytest.approx(0.5) and row["int_vs_fp32_b256_t1"] == pytest.approx(1.5)
    md = (tmp_path / "t.md").read_text()
    assert "| fashion_mnist | resnet20 | hast | W3A3 | 2 (0 1) | 81.00 ± 1.41 | 80.75 ± 1.06 | 0.50 |" in md
    assert "18 / 20" in md and "300 / 1000" in md and "| 1.50 |" in md
    from zsqpipe.plots import run_plot

    png = run_plot("deploy", [tmp_path / "t.csv"], tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from zsqpipe.errors import IntegrityError

    table.drop(columns=["int_top1_mean"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(IntegrityError, match="deploy table lacks columns"):
        run_plot("deploy", [tmp_path / "bad.csv"], tmp_path / "x.png")


def test_deploy_workflow_on_the_smoke_config(tmp_path):
    """results/tables/deploy.csv through Snakemake: export, deploy-eval and latency jobs, table, figure, MLflow."""
    import mlflow
    import pandas as pd
    from workflow_helpers import planned, snakemake, write_config

    cfg = write_config(tmp_path / "smoke.yaml", deploy={"latency": {"batch_sizes": [1, 4], "threads": [1], "runs": 2}})
    snakemake(tmp_path, cfg, "--cores", "2", "results/tables/deploy.csv", "results/plots/deploy.png")
    table = pd.read_csv(tmp_path / "results/tables/deploy.csv")
    assert sorted(table["method"]) == ["ptq", "real"] and (table["bits"] == "W4A4").all()
    assert (table["abs_int_minus_fake_max"] == 0).all() and (table["disagree_pct_mean"] == 0).all()
    assert (table["integer_kernels"] == 22).all() and (table["float_kernels"] == 0).all() and table["int_vs_fp32_b4_t1"].notna().all()
    assert (tmp_path / "results/plots/deploy.png").is_file()
    info = json.loads((tmp_path / "results/mlflow/tracking.json").read_text())
    mlflow.set_tracking_uri(info["tracking_uri"])
    runs = mlflow.search_runs(experiment_ids=[info["experiment_id"]])
    rules = runs["tags.zsq.rule"].value_counts().to_dict()
    assert {k: rules.get(k) for k in ("export", "deploy_eval", "deploy_latency", "deploy_table")} == {
        "export": 2, "deploy_eval": 2, "deploy_latency": 1, "deploy_table": 1}  # fmt: skip
    assert (runs["status"] == "FINISHED").all()
    r = snakemake(tmp_path, cfg, "-n", "results/tables/deploy.csv")
    assert "Nothing to be done" in r.stdout + r.stderr
    # a new model.pt reruns that cell's export and deploy-eval (+ the latency it times, + the table), nothing else
    import os
    import time

    model = tmp_path / "results/quant/fashion_mnist/resnet20/ptq/w4a4/seed0/model.pt"
    before = model.stat().st_mtime
    os.utime(model, (time.time() + 60, time.time() + 60))  # newer than every output
    rules = sorted((rule, wc) for rule, wc in planned(tmp_path, cfg, "results/tables/deploy.csv"))
    assert [r for r, _ in rules] == ["deploy_eval", "deploy_table", "export"]
    assert all("method=ptq" in wc for r, wc in rules if r != "deploy_table")
    # a latency setting reruns the latency job and the table only
    cfg2 = write_config(tmp_path / "smoke2.yaml", deploy={"latency": {"batch_sizes": [1, 4], "threads": [1], "runs": 3}})
    os.utime(model, (before, before))
    rules = sorted(rule for rule, _ in planned(tmp_path, cfg2, "results/tables/deploy.csv"))
    assert "export" not in rules and "deploy_eval" not in rules and "deploy_latency" in rules
