"""Stage ``oqat-search``: BitOPs-constrained search on one trained OQAT supernet (docs/methods/oqat.md).

For each budget (a fraction of the largest cell's BitOPs at the supernet's bits) an evolutionary search
(:func:`zsqpipe.nas.oqat.constrained_search`) keeps the cells within the budget and ranks them by **validation**
top-1 after BN recalibration (the same fixed training batches for every cell; scores cached across budgets).
Only after every search has finished is the test split read: test top-1 of each found cell and of the
validation-Pareto front of all evaluated cells (accuracy vs BitOPs). Nothing is retrained (OQAT).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from zsqpipe.data import make_loader
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.nas.oqat import (
    OQATSearchConfig,
    constrained_search,
    oqat_space,
    pareto_front,
    subnet_accuracy,
    subnet_bitops,
)
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.groundtruth_io import first_images
from zsqpipe.stages.oqat_io import load_oqat_supernet


def search_budgets(
    model, cfg: OQATSearchConfig, bn_batches, val_batches, input_shape, seed: int, log=print
) -> dict:
    """Run the constrained search for every budget of ``cfg`` on validation data only. Returns
    ``{max_bitops, results: [{budget, budget_bitops, arch, val_acc, bitops, n_evaluated}], scores: {arch: val}}``."""
    costs: dict = {}

    def cost(a):
        if a not in costs:
            costs[a] = subnet_bitops(model, a, input_shape)
        return costs[a]["bitops"]

    scores: dict = {}
    space = oqat_space(model)
    max_bitops = cost(space.largest)
    results = []
    for i, frac in enumerate(sorted(cfg.budgets)):  # ascending: larger budgets reuse the scored cells
        budget = frac * max_bitops
        r = constrained_search(lambda a: subnet_accuracy(model, a, bn_batches, val_batches), cost, budget, cfg,
                               seed=seed * 1000 + i, cache=scores, space=space)  # fmt: skip
        results.append({"budget": frac, "budget_bitops": budget, "arch": r["arch"], "val_acc": r["val_acc"],
                        "bitops": r["cost"], "n_evaluated": len(r["evaluated"])})  # fmt: skip
        if log is not None:
            found = (
                "none within budget"
                if r["arch"] is None
                else f"{space.to_str(r['arch'])} val {r['val_acc']:.2f}"
            )
            log(
                f"budget {frac:g} x max ({budget / 1e6:.1f} MBitOPs): {found} ({len(scores)} cells scored so far)"
            )
    return {"max_bitops": max_bitops, "results": results, "scores": scores, "costs": costs}


def _report_found(model, found: dict, bn_batches, test) -> tuple[list[dict], list[dict]]:
    """Test top-1 (after BN recalibration) and costs of the cells found per budget and of the validation
    Pareto front; each cell is tested once."""
    test_cache: dict = {}
    space = oqat_space(model)

    def test_acc(a):
        if a not in test_cache:
            test_cache[a] = subnet_accuracy(model, a, bn_batches, test)
        return test_cache[a]

    def record(a, **extra):
        c = found["costs"][a]
        return {"arch": space.to_str(a), **space.describe(a), **extra, "val_acc": found["scores"][a], "test_acc": test_acc(a),
                "bitops": c["bitops"], "macs": c["macs"], "fp_macs": c["fp_macs"], "oqat_mflops": c["oqat_mflops"]}  # fmt: skip

    results = []
    for r in found["results"]:
        if r["arch"] is None:
            results.append({**r, "arch": None, "test_acc": None})
        else:
            results.append(record(r["arch"], budget=r["budget"], budget_bitops=r["budget_bitops"],
                                  n_evaluated=r["n_evaluated"]))  # fmt: skip
    front = pareto_front((a, found["costs"][a]["bitops"], v) for a, v in found["scores"].items())
    return results, [record(a) for a, _, _ in front]


def run_oqat_search(
    supernet: Path,
    manifest: Path,
    cfg: OQATSearchConfig,
    out: Path,
    job: Job | None = None,
) -> dict:
    job = job or Job()
    tracker, log = job.tracker, job.log
    timer = Timer()
    dev = resolve_device(job.device)
    setup_runtime(job.threads, cfg.seed)
    model, ck = load_oqat_supernet(supernet, dev)
    data = load_prepared(manifest)
    info = data.info
    if ck["dataset"] != info.name:
        raise ConfigError(
            f"oqat-search: {supernet} was trained on {ck['dataset']!r}, the data is {info.name!r}"
        )
    bits = int(ck["bits"])
    tracker.log_params({"dataset": info.name, "bits": bits, "search": cfg.to_dict(), "device": str(dev)})
    input_shape = (info.in_channels, info.image_size, info.image_size)
    bn_loader = make_loader(data.train, info, cfg.batch_size, train=True, seed=cfg.seed + 2000, device=dev,
                            augment=False)  # fmt: skip
    bn_batches = list(islice(bn_loader, cfg.bn_batches))
    val = list(make_loader(first_images(data.val, cfg.val_images), info, cfg.eval_batch_size, train=False,
                           device=dev))  # fmt: skip

    found = search_budgets(model, cfg, bn_batches, val, input_shape, cfg.seed, log)
    search_time = timer()

    # ---- the search is over: only now is the test split read (report of the found cells) ----
    t_test = Timer()
    test = list(make_loader(first_images(data.test, cfg.test_images), info, cfg.eval_batch_size, train=False,
                            device=dev))  # fmt: skip
    results, pareto = _report_found(model, found, bn_batches, test)
    test_time = t_test()
    metrics = {
        "dataset": info.name, "bits": bits, "seed": cfg.seed, "config": cfg.to_dict(),
        "supernet": {"path": str(supernet), "sha256": sha256_file(supernet), "config": ck["config"],
                     "inherited_from": ck.get("inherited_from")},
        "max_bitops": found["max_bitops"], "found": results, "pareto": pareto, "n_scored": len(found["scores"]),
        "bn_images": sum(len(y) for _, y in bn_batches), "val_images": sum(len(y) for _, y in val),
        "test_images": sum(len(y) for _, y in test), "search_time_s": search_time, "test_time_s": test_time,
        "wall_time_s": timer(), "device": str(dev),
    }  # fmt: skip
    write_json(out, metrics)
    for r in results:
        if r["arch"] is not None:
            tracker.log_metrics(
                {f"test_top1_b{r['budget']:g}": r["test_acc"], f"val_top1_b{r['budget']:g}": r["val_acc"]}
            )
    tracker.log_metrics({"search_time_s": search_time, "wall_time_s": metrics["wall_time_s"]})
    tracker.log_artifact(out)
    log(f"oqat-search w{bits}a{bits} seed {cfg.seed}: {len(found['scores'])} cells scored, "
        f"{len(pareto)} on the Pareto front (search {search_time:.0f}s, test {test_time:.0f}s)")  # fmt: skip
    return metrics
