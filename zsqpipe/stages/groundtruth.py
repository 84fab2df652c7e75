"""Stage ``groundtruth``: ground-truth accuracies of a fixed sample of NB201 cells, for supernet ranking.

The sample (:func:`zsqpipe.nas.benchmark.kendall_sample`) is ``num_archs`` cells of the conventional 327-cell
Kendall subset, drawn with ``sample_seed`` (disconnected cells excluded by default). One job handles one chunk
of ``chunk_size`` cells (chunk k = sample positions k*chunk_size ..), so chunks run in parallel and rerun
separately.

- Datasets with NAS-Bench-201 ground truth in the shipped table (``cifar10``, ``cifar100``): nothing is
  trained; one chunk (0) holds the table's 200-epoch validation and test accuracy of every sampled cell, for
  all three NB201 datasets (DYNAS measures tau against each).
- Other datasets (the embedded default, Fashion-MNIST): each cell is trained stand-alone in the supernet's own
  macro skeleton (:class:`~zsqpipe.nas.supernet201.NB201Supernet` with the cell fixed, same C and N), with
  NB201's stand-alone recipe at a small budget (SGD + Nesterov, cosine LR per step, BN with affine
  parameters and running statistics), then tested on the validation split and the test set; with several
  ``seeds`` the accuracies are averaged (NB201 averages its seeds too).

docs/methods/supernet.md describes the protocol and why it deviates from DYNAS on Fashion-MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from zsqpipe.config import (
    ConfigBase,
    Doc,
    Momentum,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Range,
    Schema,
)
from zsqpipe.data import make_loader
from zsqpipe.engine import Timer, resolve_device, setup_runtime
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file, write_json
from zsqpipe.job import Job
from zsqpipe.nas.benchmark import (
    DEFAULT_PATH,
    SAMPLE_KEYS,
    TABLE_OF_DATASET,
    kendall_sample,
    table_ground_truth,
)
from zsqpipe.nas.calr import subnet_complexity
from zsqpipe.nas.spaces.nb201 import arch_to_str, index_to_arch
from zsqpipe.nas.standalone import train_cell_runs
from zsqpipe.stages.data import load_prepared
from zsqpipe.stages.groundtruth_io import first_images


@dataclass(frozen=True)
class GroundTruthConfig(ConfigBase):
    """Sample and stand-alone training recipe (defaults: the DYNAS sample = all 327 Kendall cells, and
    NB201's 200-epoch recipe; config.yaml sets the CPU budget).

    num_archs: cells drawn from the Kendall subset (null = all). sample_seed: the draw's seed.
    exclude_disconnected: drop cells whose output is cut off from their input. chunk_size: cells per job.
    epochs x iters: stand-alone training steps (iters null = a full pass over the training split per epoch).
    batch_size, lr, momentum, nesterov, wd: SGD (NB201: 256, 0.1, 0.9, true, 5e-4), cosine to 0 per step.
    augment: random crop + flip. seeds: one training run per seed, accuracies averaged. val_images /
    test_images: the first N images of the validation split / test set (null = all). eval_batch_size:
    evaluation batches (BN uses running statistics). C, N: the supernet's width and cells per stage (the
    workflow passes supernet.train.C/N: same skeleton)."""

    prefix = "supernet.groundtruth"  # how its errors name keys (ConfigBase.from_dict renames)

    num_archs: Annotated[
        int | None, Range(ge=2, le=327), Doc("cells drawn from the 327-cell Kendall subset; null = all of them")
    ] = None
    sample_seed: NonNegInt = 0
    exclude_disconnected: Annotated[
        bool, Doc("drop cells whose output is cut off from their input (1 of the 327)")
    ] = False
    chunk_size: Annotated[PosInt, Doc("cells per groundtruth job")] = 10
    epochs: PosInt = 200
    iters: Annotated[PosInt | None, Doc("steps per epoch; null = a full pass over the training split")] = None
    batch_size: PosInt = 256
    lr: PosFloat = 0.1
    momentum: Momentum = 0.9
    nesterov: bool = True
    wd: NonNegFloat = 5e-4
    augment: bool = True
    seeds: Annotated[
        list[int], Schema(minItems=1, uniqueItems=True, items={'type': 'integer', 'minimum': 0}), Doc("one stand-alone run per seed; the ground truth is their mean")
    ] = field(default_factory=lambda: [0])
    val_images: Annotated[PosInt | None, Doc("first N validation images; null = all")] = None
    test_images: Annotated[PosInt | None, Doc("first N test images; null = all")] = None
    eval_batch_size: PosInt = 1000
    C: int = 16
    N: int = 5

    def __post_init__(self):
        p = "supernet.groundtruth"
        for key in ("chunk_size", "epochs", "batch_size", "eval_batch_size", "C", "N"):
            v = getattr(self, key)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected an integer >= 1, got {v!r}")
        for key in ("iters", "val_images", "test_images"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}: expected null or an integer >= 1, got {v!r}")
        n = self.num_archs
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 2):
            raise ConfigError(f"{p}.num_archs: expected null or an integer >= 2, got {n!r}")
        if not self.lr > 0:
            raise ConfigError(f"{p}.lr: expected a positive number, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{p}.momentum: expected a number in [0, 1), got {self.momentum!r}")
        if not self.wd >= 0:
            raise ConfigError(f"{p}.wd: expected a number >= 0, got {self.wd!r}")
        seeds = self.seeds
        if not (
            isinstance(seeds, list)
            and seeds
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)
        ):
            raise ConfigError(
                f"{p}.seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}"
            )

    def sample_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLE_KEYS}


def sample_cells(cfg: GroundTruthConfig, benchmark_path: Path | None = None) -> list[int]:
    """The configured sample (table indices, in sample order)."""
    return kendall_sample(cfg.num_archs, cfg.sample_seed, cfg.exclude_disconnected, benchmark_path)


def num_chunks(dataset: str, cfg: GroundTruthConfig, benchmark_path: Path | None = None) -> int:
    """Jobs of the ground truth of ``dataset``: 1 for a table dataset, else ceil(sample size / chunk_size)."""
    if dataset in TABLE_OF_DATASET:
        return 1
    return -(-len(sample_cells(cfg, benchmark_path)) // cfg.chunk_size)


# ----------------------------------------------------------------------------------------------------------
# Stand-alone training of one cell


# ----------------------------------------------------------------------------------------------------------
# Stage


def _check_chunk(dataset: str, chunk: int, n_chunks: int) -> None:
    if not (isinstance(chunk, int) and 0 <= chunk < n_chunks):
        what = "table dataset: one chunk" if dataset in TABLE_OF_DATASET else f"{n_chunks} chunks"
        raise ConfigError(f"--chunk: {chunk!r} is out of range for {dataset} ({what}: 0..{n_chunks - 1})")


def run_groundtruth(
    dataset: str,
    chunk: int,
    cfg: GroundTruthConfig,
    out: Path,
    manifest: Path | None = None,
    benchmark_path: Path | None = None,
    job: Job | None = None,
) -> dict:
    """Write the ground truth of chunk ``chunk`` of the sample to ``out`` and return it."""
    job = job or Job()
    tracker, log = job.tracker, job.log
    timer = Timer()
    cells = sample_cells(cfg, benchmark_path)
    n_chunks = num_chunks(dataset, cfg, benchmark_path)
    _check_chunk(dataset, chunk, n_chunks)
    table = TABLE_OF_DATASET.get(dataset)
    bench = Path(benchmark_path) if benchmark_path else DEFAULT_PATH
    content: dict[str, Any] = {"dataset": dataset, "chunk": chunk, "n_chunks": n_chunks,
                               "sample": {**cfg.sample_dict(), "n_total": len(cells)},
                               "benchmark_sha256": sha256_file(bench)}  # fmt: skip
    tracker.log_params(
        {"dataset": dataset, "chunk": chunk, "n_chunks": n_chunks, "groundtruth": cfg.to_dict()}
    )
    if table is not None:  # NAS-Bench-201 ground truth: a table look-up, nothing trained
        chunk_cells = cells
        truth = table_ground_truth(chunk_cells, benchmark_path)
        records = [{"index": i, "arch": arch_to_str(index_to_arch(i)), "valid_acc": t[f"{table}_valid"],
                    "test_acc": t[f"{table}_test"], "nb201": t} for i, t in zip(chunk_cells, truth, strict=True)]  # fmt: skip
        content.update(source="nasbench201", table=table, positions=[0, len(cells)], records=records)
        log(f"{dataset}: NAS-Bench-201 ground truth of {len(records)} cells (table '{table}')")
    else:
        if manifest is None:
            raise ConfigError(f"groundtruth: {dataset} has no NAS-Bench-201 ground truth; --data is required")
        start = chunk * cfg.chunk_size
        chunk_cells = cells[start : start + cfg.chunk_size]
        dev = resolve_device(job.device)
        setup_runtime(job.threads, cfg.seeds[0])
        data = load_prepared(manifest)
        info = data.info
        val = make_loader(first_images(data.val, cfg.val_images), info, cfg.eval_batch_size, train=False,
                          device=dev)  # fmt: skip
        test = make_loader(first_images(data.test, cfg.test_images), info, cfg.eval_batch_size, train=False,
                           device=dev)  # fmt: skip
        records = []
        for pos, index in enumerate(chunk_cells):
            arch = index_to_arch(index)
            runs = train_cell_runs(arch, cfg, data, val, test, dev, job.threads)
            rec = {"index": index, "arch": arch_to_str(arch),
                   "valid_acc": sum(r["valid_acc"] for r in runs) / len(runs),
                   "test_acc": sum(r["test_acc"] for r in runs) / len(runs),
                   "complexity": subnet_complexity(arch, cfg.C, cfg.N, info.in_channels, info.num_classes),
                   "time_s": sum(r["time_s"] for r in runs), "runs": runs}  # fmt: skip
            records.append(rec)
            tracker.log_metrics({"valid_acc": rec["valid_acc"], "test_acc": rec["test_acc"],
                                 "time_s": rec["time_s"]}, step=pos)  # fmt: skip
            log(f"[{start + pos + 1}/{len(cells)}] {rec['arch']}: valid {rec['valid_acc']:.2f} "
                f"test {rec['test_acc']:.2f} ({rec['time_s']:.0f}s)")  # fmt: skip
        content.update(source="trained", config=cfg.to_dict(), device=str(dev),
                       positions=[start, start + len(chunk_cells)], records=records)  # fmt: skip
    content["wall_time_s"] = timer()
    write_json(out, content)
    tracker.log_metrics({"n_archs": len(content["records"]), "wall_time_s": content["wall_time_s"]})
    tracker.log_artifact(out)
    return content
