"""Report figures (zsqpipe/plots.py, `zsqpipe plot`) and the Snakemake report of the smoke config."""

import base64
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from workflow_helpers import snakemake, write_config

from zsqpipe import plots
from zsqpipe.cli import cli
from zsqpipe.errors import ConfigError, IntegrityError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table(methods=("real", "ptq", "hast"), bits=(3, 4, 5), std=1.0, archs=("resnet20",)):
    rows = []
    for arch in archs:
        for i, m in enumerate(methods):
            for w in bits:
                rows.append({"dataset": "fashion_mnist", "arch": arch, "method": m, "weight_bits": w, "act_bits": w,
                             "bits": f"W{w}A{w}", "fp_top1": 92.0, "last_top1_mean": 70.0 + 5 * w + i,
                             "last_top1_std": std, "best_top1_mean": 71.0 + 5 * w + i,
                             "best_top1_std": std / 2})  # fmt: skip
    return pd.DataFrame(rows)


def lines_by_style(ax):
    """Data lines of an axes (error-bar lines, not the FP reference) grouped by line style."""
    out = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            out.setdefault(c.lines[0].get_linestyle(), []).append(c)
    return out


def fp_lines(ax):
    return [ln for ln in ax.get_lines() if ln.get_linestyle() == ":" and len(set(ln.get_ydata())) == 1]


def test_bits_figure_last_solid_best_dashed_with_error_bars():
    fig = plots.bits_figure(table(), title="t", order=["hast", "real"])
    (ax,) = fig.axes[:1]
    styles = lines_by_style(ax)
    assert len(styles["-"]) == 3 and len(styles["--"]) == 3  # last (main) and best (test-selected) per method
    assert all(c.has_yerr for c in styles["-"] + styles["--"])
    labels = [c.get_label() for c in styles["-"]]
    assert labels[:2] == ["hast: last epoch (no selection)", "real: last epoch (no selection)"]
    assert all("test-selected" in c.get_label() for c in styles["--"])
    np.testing.assert_allclose(styles["-"][1].lines[0].get_ydata(), [85, 90, 95])  # real: 70 + 5w
    (fp,) = fp_lines(ax)
    assert fp.get_ydata()[0] == 92.0
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W3A3", "W4A4", "W5A5"]
    legend_text = " ".join(t.get_text() for leg in fig.legends for t in leg.get_texts())
    assert "last epoch" in legend_text and "test-selected" in legend_text


def test_bits_figure_one_panel_per_arch_and_no_error_bars_for_one_seed():
    fig = plots.bits_figure(table(std=np.nan, archs=("resnet20", "mobilenet_v2_small")))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2
    for ax in panels:
        styles = lines_by_style(ax)
        assert not any(c.has_yerr for c in styles["-"] + styles["--"])


def test_ablation_figure_bars_and_error_bars():
    t = table(methods=("hast_none", "hast_hss", "hast_sdp", "hast_fa", "hast"), bits=(3,))
    fig = plots.ablation_figure(t, order=["hast_none", "hast_hss", "hast_sdp", "hast_fa", "hast"])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(b) for b in bars] == [5, 5]  # last epoch, best epoch (hatched)
    assert bars[0].get_label() == "last epoch (no selection)" and "test-selected" in bars[1].get_label()
    assert all(p.get_hatch() == "//" for p in bars[1]) and all(not p.get_hatch() for p in bars[0])
    assert [p.get_height() for p in bars[0]] == [85.0, 86.0, 87.0, 88.0, 89.0]
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "hast_none",
        "hast_hss",
        "hast_sdp",
        "hast_fa",
        "hast",
    ]
    assert len(fp_lines(ax)) == 1


LONG_TITLE = "HAST at W3A3: activation ranges calibrated on 50 (default), 200 or 800 (official 4 x 200) GDFQ-generator batches"  # fmt: skip


@pytest.mark.parametrize("kind", ["bits", "ablation", "nas"])
def test_a_long_title_fits_inside_the_figure(kind):
    """Every figure shows its whole title (wrapped), also a one-panel figure with a long table title."""
    if kind == "bits":
        fig = plots.bits_figure(table(methods=("real", "ptq")), title=LONG_TITLE)
    elif kind == "ablation":
        fig = plots.ablation_figure(table(methods=("hast_none", "hast"), bits=(3,)), title=LONG_TITLE)
    else:
        fig = plots.nas_curves_figure([search_result("rea", "cifar10", [[1, 2]])], title=LONG_TITLE)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    assert " ".join(fig._suptitle.get_text().split()) == LONG_TITLE


def search_result(strategy, dataset, curves, layout="best"):
    recs = []
    for seed, vals in enumerate(curves):
        rec = {"seed": seed, "strategy": strategy, "dataset": dataset}
        if layout == "best":
            rec["best_valid_so_far"] = np.maximum.accumulate(vals).tolist()
        else:  # only the per-query history [index, valid_acc]
            rec["history"] = [[i, v] for i, v in enumerate(vals)]
        recs.append(rec)
    return {"strategy": strategy, "dataset": dataset, "records": recs}


def test_nas_curves_mean_and_band_per_strategy():
    a = search_result("random", "cifar10", [[80, 85, 84, 90], [70, 75, 88, 88]])
    b = search_result("ase", "cifar10", [[60, 90, 91], [70, 80]], layout="history")  # stopped early: padded
    fig = plots.nas_curves_figure([a, b], order=["random", "ase"], optimum={"cifar10": 91.6})
    (ax,) = [x for x in fig.axes if x.get_visible()]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_allclose(lines["random (2 seeds)"].get_ydata(), [75, 80, 86.5, 89])
    np.testing.assert_allclose(lines["ase (2 seeds)"].get_ydata(), [65, 85, 85.5])
    np.testing.assert_array_equal(lines["random (2 seeds)"].get_xdata(), [1, 2, 3, 4])
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # +-std bands
    assert lines["best validation accuracy in the table"].get_ydata()[0] == 91.6


def test_nas_curves_one_panel_per_dataset_and_old_layout():
    old = {"seed": 0, "strategy": "rea", "dataset": "cifar100", "best_valid_so_far": [50.0, 60.0]}
    fig = plots.nas_curves_figure([old, search_result("rea", "cifar10", [[1, 2]])])
    assert len([x for x in fig.axes if x.get_visible()]) == 2
    with pytest.raises(IntegrityError, match="no per-query history"):
        plots.nas_curves_figure([{"strategy": "rea", "dataset": "cifar10", "records": [{"seed": 3}]}])


def test_save_png_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "plots" / "x.png"
    plots.save_png(plots.bits_figure(table()), out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    before = out.read_bytes()
    fig = plots.bits_figure(table(methods=("real",)))

    def broken(path, **kwargs):
        with open(path, "wb") as f:
            f.write(PNG_MAGIC)  # half-written
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        plots.save_png(fig, out)
    assert out.read_bytes() == before  # the old file is untouched
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left behind


def test_run_plot_checks_inputs(tmp_path):
    csv = tmp_path / "t.csv"
    table().to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="one results table"):
        plots.run_plot("bits", [csv, csv], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="unknown keys"):
        plots.run_plot("bits", [csv], tmp_path / "x.png", style={"colour": "red"})
    with pytest.raises(IntegrityError, match="lacks columns"):
        pd.DataFrame({"method": ["a"]}).to_csv(csv, index=False)
        plots.run_plot("ablation", [csv], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_command(tmp_path):
    csv = tmp_path / "t.csv"
    table().to_csv(csv, index=False)
    out = tmp_path / "p.png"
    r = CliRunner().invoke(cli, ["plot", "--kind", "bits", str(csv), "--out", str(out), "--order", "hast,real",
                                 "--style", '{"dpi": 50}'])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    r = CliRunner().invoke(
        cli, ["plot", "--kind", "bits", str(csv), "--out", str(out), "--style", '{"x": 1}']
    )
    assert r.exit_code == 1 and "zsqpipe plot: error: plot style: unknown keys ['x']" in r.output


def steps_table():
    """real / real_s200 and hast / hast_s200 at W3A3, with val-selected columns."""
    t = table(methods=("real", "real_s200", "hast", "hast_s200"), bits=(3,))
    return t.assign(val_selected_top1_mean=t["last_top1_mean"] - 1, val_selected_top1_std=0.5)


def test_student_steps_from_the_resolved_method_config():
    from zsqpipe.budget import student_steps

    assert student_steps("real", {"epochs": 2, "iters_per_epoch": 100}) == 200
    assert student_steps("gdfq", {"epochs": 3, "warmup_epochs": 1, "iters_per_epoch": 20}) == 40  # no warm-up
    assert student_steps("zaq", {"epochs": 2, "iters_per_epoch": 4}) == 2 * 4 * 5  # 5 student steps each
    assert student_steps("ptq") == 0 and student_steps("zeroq", {"finetune": False}) == 0


def test_steps_figure_one_line_per_base_method_through_its_variants():
    steps = {"real": ("real", 40), "real_s200": ("real", 200), "hast": ("hast", 40), "hast_s200": ("hast", 200)}
    fig = plots.steps_figure(steps_table(), steps, order=["hast", "hast_s200", "real", "real_s200"])
    ax = fig.axes[0]
    styles = lines_by_style(ax)
    assert [c.get_label() for c in styles["-"]] == ["hast", "real"]  # one solid line per base, in order
    np.testing.assert_allclose(styles["-"][1].lines[0].get_xdata(), [40, 200])
    np.testing.assert_allclose(styles["-"][1].lines[0].get_ydata(), [85, 86])  # real, real_s200: 70 + 15 + i
    np.testing.assert_allclose(styles["--"][1].lines[0].get_ydata(), [84, 85])  # val-selected
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["40", "200"]
    with pytest.raises(ConfigError, match=r"no step count for \['real_s200'\]"):
        plots.steps_figure(steps_table(), {k: v for k, v in steps.items() if k != "real_s200"})


def test_steps_figure_draws_a_calibration_only_method_as_a_level_line():
    t = steps_table()
    ptq = t[t["method"] == "real"].assign(method="ptq", last_top1_mean=71.5)
    steps = {"real": ("real", 40), "real_s200": ("real", 200), "hast": ("hast", 40), "hast_s200": ("hast", 200),
             "ptq": ("ptq", 0)}  # fmt: skip
    ax = plots.steps_figure(pd.concat([t, ptq]), steps).axes[0]
    level = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-." and ln.get_label() == "ptq (0 steps)"]
    assert len(level) == 1 and list(level[0].get_ydata()) == [71.5, 71.5]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["40", "200"]


def test_plot_command_steps(tmp_path):
    csv, out = tmp_path / "t.csv", tmp_path / "s.png"
    steps_table().to_csv(csv, index=False)
    methods = ('{"real": {"method": "real", "cfg": {}}, "real_s200": {"method": "real", "cfg": {"iters_per_epoch":'
               ' 100}}, "hast": {"method": "hast"}, "hast_s200": {"method": "hast", "cfg": {"iters_per_epoch": 100}}}')
    r = CliRunner().invoke(cli, ["plot", "--kind", "steps", str(csv), "--out", str(out), "--methods", methods])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    r = CliRunner().invoke(cli, ["plot", "--kind", "steps", str(csv), "--out", str(tmp_path / "n.png")])
    assert r.exit_code == 1 and "expected one results table and --methods" in r.output


def test_progress_only_on_a_terminal(monkeypatch):
    import io
    import sys

    from zsqpipe.progress import progress

    bar = progress(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]  # pytest's captured stderr is not a TTY: a pass-through

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert list(progress(range(3), desc="steps", ncols=80)) == [0, 1, 2]
    assert "steps" in sys.stderr.getvalue()


SMOKE_PLOTS = [
    "results/plots/hast_bits.png",
    "results/plots/hast_bars.png",
    "results/plots/nas_curves_cifar10.png",
]


def test_smoke_report(tmp_path):
    """The smoke config's plots and `snakemake --report`: a self-contained HTML with every plot embedded.
    MLflow tracking is off (not what is tested here; it saves an MLflow import per job)."""
    cfg = write_config(tmp_path / "smoke.yaml", tracking=False)
    snakemake(tmp_path, cfg, "--cores", "2", *SMOKE_PLOTS)
    report = tmp_path / "report.html"
    snakemake(tmp_path, cfg, "--report", str(report), *SMOKE_PLOTS)
    html = report.read_text()
    # self-contained: no script, stylesheet or image is fetched from the network
    assert not re.findall(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)
    assert not re.findall(r"""\b(?:src|href)\s*=\s*\\?["'](?:https?:)?//""", html)
    for path in SMOKE_PLOTS:
        png = (tmp_path / path).read_bytes()
        assert png[:8] == PNG_MAGIC
        name = path.rsplit("/", 1)[1]
        m = re.search(
            rf"data:image/png;charset=utf8;filename={re.escape(name)};base64,([A-Za-z0-9+/=]+)", html
        )
        assert m and base64.b64decode(m.group(1)) == png, f"{name} is not embedded"
        log = (tmp_path / "results/logs/plot" / name).with_suffix(".log")
        assert log.is_file() and (tmp_path / "results/benchmarks/plot" / name).with_suffix(".tsv").is_file()
    assert "selected on the test set" in html  # the bits/bars captions
    assert "best validation accuracy found so far" in html  # the NAS caption
    assert "Honesty rule" in html  # the workflow description
