"""Stage ``supernet-search``: NAS with a trained NB201 supernet as the evaluator (docs/methods/nas_search.md,
*Supernet evaluator*), and ``supernet-search-table``.

The strategies of the tabular ``search`` stage (random, rea, reinforce, ase, ase_plus) query a
:class:`~zsqpipe.nas.supernet201.SupernetEvaluator` instead of the benchmark: a cell's score is the supernet's top-1 on the first
``val_images`` **validation** images after BN recalibration on fixed training batches (when its BN tracks
statistics; DYNAS' supernet uses batch statistics). Every query counts against the budget; a cell's score
is computed once and cached (the evaluator is deterministic). The evaluator holds only training (BN) and
validation batches; test images are batched and scored only after every search has returned: the found
cell's supernet top-1 on them, and its true accuracy: on a NAS-Bench-201 dataset (CIFAR-10/100) the table's
200-epoch test accuracy, elsewhere (with ``standalone``) the cell trained stand-alone with the
``groundtruth`` stage's recipe (``supernet.groundtruth``) on the same data, as the cells the supernet is
ranked against in ``supernet.csv``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch

from zsqpipe.config import ConfigBase, Doc, PosInt, Schema
from zsqpipe.data import make_loader
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.errors import ConfigError, IntegrityError
from zsqpipe.io import (
    markdown_table,
    mean_pm_std,
    read_json,
    sha256_file,
    write_json,
    write_table,
)
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import TABLE_OF_DATASET, table_ground_truth
from zsqpipe.nas.calr import SupernetConfig
from zsqpipe.nas.spaces.nb201 import Arch, arch_to_index, arch_to_str
from zsqpipe.nas.standalone import train_cell_runs
from zsqpipe.nas.strategies import STRATEGY_NAMES, run_strategy
from zsqpipe.nas.supernet201 import SupernetEvaluator, build_supernet, evaluate_subnets
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.groundtruth import GroundTruthConfig
from zsqpipe.stages.groundtruth_io import first_images, load_groundtruth
from zsqpipe.stages.model_io import checkpoint_of_kind, load_state_checked


@dataclass(frozen=True)
class SupernetSearchConfig(ConfigBase):
    """Config ``supernet.search`` (without ``strategies``). budget: queries per search; seeds: search seeds
    per supernet; bn_batches x batch_size: training images that recalibrate BN before a cell is scored;
    val_images: validation images that score a cell (the search signal); test_images: test images of the
    report (null = all); standalone: train each found cell stand-alone (``supernet.groundtruth`` recipe) for
    its true test accuracy (datasets without NAS-Bench-201 ground truth; CIFAR reads the table)."""

    prefix = "supernet.search"  # how its errors name keys (ConfigBase.from_dict renames)

    budget: Annotated[PosInt, Doc("queries per search")] = 30
    seeds: Annotated[
        tuple[int, ...], Schema(minItems=1, uniqueItems=True, items={'type': 'integer', 'minimum': 0}), Doc("search seeds per supernet")
    ] = (0,)
    bn_batches: Annotated[PosInt, Doc("BN recalibration batches before a cell is scored")] = 5
    batch_size: PosInt = 64
    val_images: Annotated[PosInt | None, Doc("validation images that score a cell")] = 1000
    test_images: PosInt | None = None
    eval_batch_size: PosInt = 500
    standalone: Annotated[
        bool, Doc("train each found cell stand-alone (supernet.groundtruth recipe) for its true test accuracy")
    ] = True

    def __post_init__(self):
        p = "supernet.search"
        for key in ("budget", "bn_batches", "batch_size", "eval_batch_size"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected an integer >= 1, got {v!r}")
        for key in ("val_images", "test_images"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected null or an integer >= 1, got {v!r}")
        seeds = tuple(self.seeds) if isinstance(self.seeds, list | tuple) else None
        if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ConfigError(f"{p}.seeds: expected a non-empty list of integers >= 0, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{p}.seeds: duplicate seed in {list(seeds)}")
        object.__setattr__(self, "seeds", seeds)


def load_nb201_supernet(path: Path, device) -> tuple[torch.nn.Module, dict]:
    """The supernet of a ``supernet-train`` checkpoint and the checkpoint's metadata."""
    ck = checkpoint_of_kind(path, "nb201_supernet", "a supernet-train checkpoint")
    cfg = SupernetConfig.from_dict(ck["config"], f"{path}: config")
    model = build_supernet(cfg, ck["in_channels"], ck["num_classes"])
    load_state_checked(model, ck.pop("state_dict"), path, "the supernet of its config")
    return model.to(device).eval(), ck


def _true_accuracy(archs, table, cfg, groundtruth, data, dev, job: Job) -> dict[Arch, dict]:
    """The found cells' true accuracy: NAS-Bench-201's 200-epoch numbers on CIFAR (``table``), else, with
    ``cfg.standalone``, stand-alone training with the groundtruth stage's recipe and seeds."""
    truth: dict[Arch, dict] = {}
    if table is not None:
        for arch, t in zip(archs, table_ground_truth(archs), strict=True):
            truth[arch] = {"source": "nasbench201", "test_acc": t[f"{table}_test"], "valid_acc": t[f"{table}_valid"]}
    elif cfg.standalone:
        info = data.info
        gt_val = make_loader(first_images(data.val, groundtruth.val_images), info, groundtruth.eval_batch_size,
                             train=False, device=dev)  # fmt: skip
        gt_test = make_loader(first_images(data.test, groundtruth.test_images), info, groundtruth.eval_batch_size,
                              train=False, device=dev)  # fmt: skip
        for arch in archs:  # the groundtruth stage's recipe and seeds: comparable with its cells
            runs = train_cell_runs(arch, groundtruth, data, gt_val, gt_test, dev, job.threads)
            truth[arch] = {"source": "standalone", "test_acc": float(np.mean([r["test_acc"] for r in runs])),
                           "valid_acc": float(np.mean([r["valid_acc"] for r in runs])), "runs": runs}  # fmt: skip
            job.log(f"stand-alone {arch_to_str(arch)}: test {truth[arch]['test_acc']:.2f}")
    return truth


def run_supernet_search(
    supernet: Path,
    manifest: Path,
    strategy: str,
    cfg: SupernetSearchConfig,
    out: Path,
    strategy_params: dict | None = None,
    groundtruth: GroundTruthConfig | None = None,
    job: Job | None = None,
) -> dict:
    """Search with ``strategy`` once per ``cfg.seeds`` on the supernet's validation scores; then report each
    found cell (supernet test top-1; stand-alone test top-1 with ``cfg.standalone``). Writes and returns
    ``{dataset, strategy, supernet, config, records: [one per seed], ...}``."""
    job = job or Job()
    tracker, log = job.tracker, job.log
    timer = Timer()
    if strategy not in STRATEGY_NAMES or strategy == "ase_plus":
        names = [s for s in STRATEGY_NAMES if s != "ase_plus"]
        raise ConfigError(f"supernet.search.strategies: {strategy!r} is not one of {names}")
    dev = resolve_device(job.device)
    setup_runtime(job.threads, cfg.seeds[0])
    model, ck = load_nb201_supernet(supernet, dev)
    data = load_prepared(manifest)
    info = data.info
    table = TABLE_OF_DATASET.get(info.name)
    if table is None and cfg.standalone and groundtruth is None:
        raise ConfigError("supernet-search: standalone training needs the supernet.groundtruth recipe")
    if ck["dataset"] != info.name:
        raise ConfigError(
            f"supernet-search: {supernet} was trained on {ck['dataset']!r}, the data is {info.name!r}"
        )
    params = dict(strategy_params or {})
    label = ck.get("label", ck["config"]["method"])  # the supernet.variants name (older checkpoints: the method)
    tracker.log_params({"dataset": info.name, "strategy": strategy, "search": cfg.to_dict(), "params": params,
                        "supernet_method": label, "supernet_seed": ck["config"]["seed"]})  # fmt: skip
    bn_loader = make_loader(
        data.train, info, cfg.batch_size, train=True, seed=10_000, device=dev, augment=False
    )
    bn = list(islice(bn_loader, cfg.bn_batches))
    val = list(make_loader(first_images(data.val, cfg.val_images), info, cfg.eval_batch_size, train=False,
                           device=dev))  # fmt: skip
    evaluator = SupernetEvaluator(model, bn, val, dev)
    found = []
    for step, seed in enumerate(cfg.seeds):
        t0 = time.perf_counter()
        calls0, scored0 = evaluator.calls, len(evaluator.scores)
        result = run_strategy(strategy, evaluator, cfg.budget, seed, params, log)
        found.append({"seed": seed, "arch": result.best_arch, "supernet_val_acc": result.best_valid,
                      "queries": len(result.history), "new_cells_scored": len(evaluator.scores) - scored0,
                      "search_time_s": time.perf_counter() - t0})  # fmt: skip
        assert evaluator.calls - calls0 == len(result.history)
        tracker.log_metrics({"supernet_val_acc": result.best_valid}, step=step)
        log(f"seed {seed}: {arch_to_str(result.best_arch)} supernet val {result.best_valid:.2f} "
            f"({found[-1]['search_time_s']:.0f}s, {found[-1]['new_cells_scored']} new cells scored)")  # fmt: skip
    search_time = timer()

    # ---- every search has returned: only now are test images batched and scored ----
    test = list(make_loader(first_images(data.test, cfg.test_images), info, cfg.eval_batch_size, train=False,
                            device=dev))  # fmt: skip
    archs = sorted({f["arch"] for f in found})
    sn_test = dict(zip(archs, evaluate_subnets(model, archs, bn, test, len(bn), dev), strict=True))
    truth = _true_accuracy(archs, table, cfg, groundtruth, data, dev, job)
    records = [{"dataset": info.name, "strategy": strategy, **{k: v for k, v in f.items() if k != "arch"},
                "arch": arch_to_str(f["arch"]), "index": arch_to_index(f["arch"]),
                "supernet_test_acc": sn_test[f["arch"]], "truth": truth.get(f["arch"])} for f in found]  # fmt: skip
    content = {
        "dataset": info.name, "strategy": strategy, "params": params, "config": cfg.to_dict(),
        "groundtruth_config": groundtruth.to_dict() if groundtruth is not None and table is None else None,
        "supernet": {"path": str(supernet), "sha256": sha256_file(supernet), "method": label,
                     "seed": ck["config"]["seed"], "config": ck["config"]},
        "records": records, "n_scored": len(evaluator.scores), "bn_images": sum(len(y) for _, y in bn),
        "val_images": sum(len(y) for _, y in val), "test_images": sum(len(y) for _, y in test),
        "search_time_s": search_time, "wall_time_s": timer(), "device": str(dev),
    }  # fmt: skip
    write_json(out, content)
    tracker.log_metrics({"search_time_s": search_time, "wall_time_s": content["wall_time_s"]})
    tracker.log_artifact(out)
    return content


# ---------------------------------------------------------------------------------------------------------
# Table

NOTE = (
    "Searches on a trained NB201 supernet (the evaluator: supernet top-1 on validation images after BN "
    "recalibration), one per supernet seed x search seed. true test = test top-1 (%) of the found cell: trained "
    "alone with the groundtruth recipe (its true accuracy at our budget), or NAS-Bench-201's 200-epoch test "
    "accuracy on CIFAR; mean ± sample std over the searches; supernet val / test = the supernet's estimate. "
    "Reference rows from the groundtruth sample (random cells, the same ground truth): their mean ± std and "
    "the best of them."
)


def summarize_searches(paths: list[Path], groundtruth: list[Path] | None = None) -> pd.DataFrame:
    rows = []
    for p in paths:
        c = read_json(p)
        if not isinstance(c, dict) or not c.get("records"):
            raise IntegrityError(f"{p}: supernet-search file without 'records'")
        for r in c["records"]:
            sa = r.get("truth") or {}
            rows.append({"dataset": c["dataset"], "supernet": c["supernet"]["method"], "strategy": c["strategy"],
                         "supernet_seed": c["supernet"]["seed"], "seed": r["seed"], "arch": r["arch"],
                         "queries": r["queries"], "val": r["supernet_val_acc"], "sn_test": r["supernet_test_acc"],
                         "test": sa.get("test_acc", np.nan), "time": r["search_time_s"]})  # fmt: skip
    if not rows:
        raise IntegrityError("supernet-search-table: no search files given")
    df = pd.DataFrame(rows)
    out = []
    for (dataset, method, strategy), g in df.groupby(["dataset", "supernet", "strategy"], sort=True):
        n = len(g)

        def sd(col: str, g=g, n=n) -> float:
            return float(g[col].std(ddof=1)) if n > 1 else np.nan

        out.append({"dataset": dataset, "supernet": method, "strategy": strategy, "n_searches": n,
                    "runs": " ".join(f"{a}/{b}" for a, b in zip(g["supernet_seed"], g["seed"], strict=True)),
                    "queries": float(g["queries"].mean()),
                    "true_test_mean": float(g["test"].mean()), "true_test_std": sd("test"),
                    "supernet_val_mean": float(g["val"].mean()), "supernet_val_std": sd("val"),
                    "supernet_test_mean": float(g["sn_test"].mean()), "supernet_test_std": sd("sn_test"),
                    "n_distinct_archs": int(g["arch"].nunique()), "search_time_s_mean": float(g["time"].mean())})  # fmt: skip
    by_dataset: dict[str, list[Path]] = {}
    for p in groundtruth or []:  # one reference pair per dataset
        by_dataset.setdefault(read_json(p).get("dataset"), []).append(p)
    for _, files in sorted(by_dataset.items(), key=lambda kv: str(kv[0])):
        gt = load_groundtruth(files)
        tests = np.array([r["test_acc"] for r in gt["records"]], dtype=float)
        for name, mean, std in (("random cell (groundtruth sample)", tests.mean(), tests.std(ddof=1)),
                                ("best groundtruth cell", tests.max(), np.nan)):  # fmt: skip
            out.append({"dataset": gt["dataset"], "supernet": "-", "strategy": name, "n_searches": len(tests),
                        "true_test_mean": float(mean), "true_test_std": float(std)})  # fmt: skip
    return pd.DataFrame(out)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    cols = ["dataset", "supernet", "strategy", "searches", "queries", "true test", "supernet val",
            "supernet test", "distinct cells", "search s"]  # fmt: skip
    rows = []
    for _, r in table.iterrows():

        def get(k: str, r=r) -> float:
            return r[k] if k in r and not pd.isna(r[k]) else np.nan

        cells = [r["dataset"], r["supernet"], r["strategy"], str(r["n_searches"]),
                 "" if np.isnan(get("queries")) else f"{get('queries'):.0f}",
                 mean_pm_std(get("true_test_mean"), get("true_test_std")),
                 mean_pm_std(get("supernet_val_mean"), get("supernet_val_std")),
                 mean_pm_std(get("supernet_test_mean"), get("supernet_test_std")),
                 "" if np.isnan(get("n_distinct_archs")) else str(int(get("n_distinct_archs"))),
                 "" if np.isnan(get("search_time_s_mean")) else f"{get('search_time_s_mean'):.0f}"]  # fmt: skip
        rows.append(cells)
    return "\n".join(markdown_table(title, [NOTE], cols, rows)) + "\n"


def run_supernet_search_table(
    paths: list[Path],
    out_csv: Path,
    out_md: Path,
    groundtruth: list[Path] | None = None,
    title: str = "NAS with a trained supernet as the evaluator",
) -> pd.DataFrame:
    table = summarize_searches(paths, groundtruth)
    write_table(table, out_csv, out_md, to_markdown(table, title))
    return table
