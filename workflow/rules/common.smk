# Helpers shared by all rules: config validation, params builders, code versions, output paths.
import hashlib
import os
import shutil
import sys

from zsqpipe.codehash import code_version
from zsqpipe.config import canonical_json, validate_config
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file
from zsqpipe.nas.benchmark import DATASETS as NAS_DATASETS
from zsqpipe.nas.benchmark import DEFAULT_PATH as NAS_BENCHMARK
from zsqpipe.nas.strategies import STRATEGY_NAMES
from zsqpipe.names import ARCH_NAMES, DATASET_NAMES, METHOD_NAMES, METHOD_SYNTHESIZER, SYNTHESIZER_NAMES


try:
    _validated = validate_config(config)
except ConfigError as _err:
    sys.exit(f"zsqpipe: invalid config: {_err}")
config.clear()
config.update(_validated)


VARIANTS = config["variants"]


wildcard_constraints:
    dataset="|".join(DATASET_NAMES),
    arch="|".join(ARCH_NAMES),
    method="|".join(list(METHOD_NAMES) + list(VARIANTS)),
    wbits=r"\d+",
    abits=r"\d+",
    seed=r"\d+",
    synth="(" + ("|".join(SYNTHESIZER_NAMES) or "none") + ")(@[0-9a-f]{8})?",
    table="|".join(config["tables"]),


RESULTS = "results"
LOGS = "results/logs"
BENCH = "results/benchmarks"
TRACKING = "results/mlflow/tracking.json"
QUANT_DIR = "results/quant/{dataset}/{arch}/{method}/w{wbits}a{abits}/seed{seed}"


def gpus(wildcards=None):
    """GPUs a training job asks for (Snakemake resource `gpu`): 1 for `cuda*`, and for `auto` on a machine
    with an NVIDIA driver (so the profile's `gpu` pool serialises GPU jobs)."""
    device = config["device"]
    if device == "auto":
        return 1 if shutil.which("nvidia-smi") else 0
    return 1 if device.startswith("cuda") else 0


def tracking_uri():
    """The MLflow store in use: a param of mlflow_init only (switching stores reruns nothing else)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:results/mlflow/mlflow.db")


def data_params(wildcards):
    return canonical_json(config["data"])


def fp_params(wildcards):
    fp = {k: v for k, v in config["fp_model"].items() if k != "checkpoints"}
    fp["checkpoint"] = config["fp_model"]["checkpoints"].get(f"{wildcards.dataset}/{wildcards.arch}")
    return canonical_json(fp)


def fp_checkpoint_input(wildcards):
    path = config["fp_model"]["checkpoints"].get(f"{wildcards.dataset}/{wildcards.arch}")
    return [path] if path else []


def quant_params(wildcards):
    overrides = VARIANTS.get(wildcards.method, {}).get("quant", {})
    return canonical_json({**config["quant"], **overrides})


def base_method(name):
    """A method name, or a variant's base method (config `variants`)."""
    return VARIANTS[name]["method"] if name in VARIANTS else name


def method_base(wildcards):
    return base_method(wildcards.method)


def method_params(wildcards):
    base = base_method(wildcards.method)
    overrides = VARIANTS.get(wildcards.method, {}).get("methods", {})
    return canonical_json({**config["methods"].get(base, {}), **overrides})


def overrides_tag(overrides):
    """Short stable name for a set of synthesis overrides (variants with equal overrides share samples)."""
    return hashlib.sha256(canonical_json(overrides).encode()).hexdigest()[:8]


SYNTH_OVERRIDES = {overrides_tag(v["synthesis"]): v["synthesis"] for v in VARIANTS.values() if v.get("synthesis")}


def sample_set(method):
    """Name of the synthetic sample set a method (or variant) trains on: `<synthesizer>[@<overrides tag>]`."""
    synth = METHOD_SYNTHESIZER.get(base_method(method))
    if synth is None:
        return None
    overrides = VARIANTS.get(method, {}).get("synthesis")
    return f"{synth}@{overrides_tag(overrides)}" if overrides else synth


def samples_input(wildcards):
    """The synthetic-sample folder a method trains on (same dataset, arch and seed), if any."""
    name = sample_set(wildcards.method)
    if name is None:
        return []
    return [f"{RESULTS}/samples/{wildcards.dataset}/{wildcards.arch}/{name}/seed{wildcards.seed}"]


def samples_flag(wildcards, input):
    return f"--samples {input.samples}" if input.samples else ""


def synthesizer(wildcards):
    return wildcards.synth.split("@")[0]


def synth_params(wildcards):
    synth, _, tag = wildcards.synth.partition("@")
    overrides = SYNTH_OVERRIDES[tag] if tag else {}
    return canonical_json({**config["synthesis"].get(synth, {}), **overrides})


def synth_code(wildcards):
    return code_version("zsqpipe.stages.synthesize", f"zsqpipe.zsq.synth_{synthesizer(wildcards)}")


def quantize_code(wildcards):
    return code_version("zsqpipe.stages.quantize", f"zsqpipe.methods.{base_method(wildcards.method)}")


def cell_json(wildcards):
    return canonical_json(
        {
            "dataset": wildcards.dataset,
            "arch": wildcards.arch,
            "method": wildcards.method,
            "w_bits": int(wildcards.wbits),
            "a_bits": int(wildcards.abits),
            "seed": int(wildcards.seed),
        }
    )


def parse_bits(pair):
    w, a = pair[1:].split("a")
    return int(w), int(a)


def table_title(wildcards):
    return config["tables"][wildcards.table]["title"]


def table_paper(wildcards):
    return canonical_json(config["tables"][wildcards.table]["paper"])


def table_metrics(wildcards):
    """metrics.json of every cell of a results table (datasets x archs x methods x bits x seeds)."""
    t = config["tables"][wildcards.table]
    out = []
    for dataset in config["datasets"]:
        for arch in t["archs"]:
            for method in t["methods"]:
                for pair in t["bits"]:
                    w, a = parse_bits(pair)
                    for seed in t["seeds"]:
                        out.append(
                            f"{RESULTS}/quant/{dataset}/{arch}/{method}/w{w}a{a}/seed{seed}/metrics.json"
                        )
    return out


# ---- Tabular NAS (workflow/rules/nas.smk): search results and the nas table ----
NAS = config["nas"]
NAS_BENCHMARK_SHA = sha256_file(NAS_BENCHMARK)[:16]
NAS_RESULT = f"{RESULTS}/nas/{{space}}/{{dataset}}/{{strategy}}/seed{{seed}}.json"


def nas_strategy_params(strategy):
    """A strategy's settings: nas.params.<strategy>; ase_plus = ase's settings + its own (init_from is the
    workflow's business: it becomes an input file, not a strategy setting)."""
    params = dict(NAS["params"].get(strategy, {}))
    if strategy == "ase_plus":
        params = {**NAS["params"]["ase"], **params}
        params.pop("init_from", None)
    return params


def nas_params(wildcards):
    return canonical_json(nas_strategy_params(wildcards.strategy))


def nas_init_input(wildcards):
    """ase_plus with nas.params.ase_plus.init_from: the seeding search's result (same space and seed)."""
    if wildcards.strategy != "ase_plus" or not NAS["params"]["ase_plus"].get("init_from"):
        return []
    src = NAS["params"]["ase_plus"]["init_from"]
    path = NAS_RESULT.format(
        space=wildcards.space, dataset=src["dataset"], strategy=src["strategy"], seed=wildcards.seed
    )
    return [path]


def nas_init_flag(wildcards, input):
    return f"--init-from {input.init}" if input.init else ""


def nas_code(wildcards):
    return code_version("zsqpipe.stages.search", f"zsqpipe.nas.strategies.{wildcards.strategy}")


def nas_results(wildcards):
    return [
        NAS_RESULT.format(space=NAS["space"], dataset=d, strategy=s, seed=seed)
        for d in NAS["datasets"]
        for s in NAS["strategies"]
        for seed in NAS["seeds"]
    ]
