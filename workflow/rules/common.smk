# Helpers shared by all rules: config validation, params builders, code versions, output paths.
import functools
import hashlib
import os
import shutil
import sys

from zsqpipe.codehash import code_version
from zsqpipe.config import canonical_json, check_config_paths, resolve_checkpoint, validate_config
from zsqpipe.errors import ConfigError
from zsqpipe.io import sha256_file
from zsqpipe.nas.benchmark import DATASETS as NAS_DATASETS
from zsqpipe.nas.benchmark import DEFAULT_PATH as NAS_BENCHMARK
from zsqpipe.nas.benchmark import SAMPLE_KEYS, TABLE_OF_DATASET, kendall_sample
from zsqpipe.nas.strategies import STRATEGY_NAMES
from zsqpipe.names import ARCH_NAMES, DATASET_INPUT_SHAPES, DATASET_NAMES, METHOD_NAMES, METHOD_SYNTHESIZER, SUPERNET_METHOD_NAMES, SYNTHESIZER_NAMES
from zsqpipe.warmups import WARMUP_KINDS, record_mb, warmup_spec, warmup_tag


REPO_DIR = os.path.dirname(workflow.basedir)  # the checkout; its checkpoints/ ships the default's FP model

try:
    _validated = validate_config(config)
    check_config_paths(_validated, ".", REPO_DIR)  # relative paths from the working directory, else the checkout
except ConfigError as _err:
    sys.exit(f"zsqpipe: invalid config: {_err}")
config.clear()
config.update(_validated)


VARIANTS = config["variants"]


wildcard_constraints:
    dataset="|".join(DATASET_NAMES),
    arch="|".join(ARCH_NAMES),
    method="|".join(list(METHOD_NAMES) + list(VARIANTS)),
    weight_bits=r"\d+",
    act_bits=r"\d+",
    seed=r"\d+",
    synth="(" + ("|".join(SYNTHESIZER_NAMES) or "none") + ")(@[0-9a-f]{8})?",
    warmup="(" + "|".join(WARMUP_KINDS) + ")@[0-9a-f]{8}",
    table="|".join(config["tables"]),


RESULTS = "results"
LOGS = "results/logs"
BENCH = "results/benchmarks"
TRACKING = "results/mlflow/tracking.json"
QUANT_DIR = "results/quant/{dataset}/{arch}/{method}/w{weight_bits}a{act_bits}/seed{seed}"
# Epoch checkpoints of fp_model/quantize/oqat_train/supernet_train, outside their outputs (zsqpipe/resume.py): the rules' `resume`
# resource, like `threads` a run-time setting, not a param, because resuming never changes a result and
# toggling config `resume` must rerun no job (params and the shell text are rerun triggers).
RESUME = f"--resume-root {RESULTS}/.resume" if config["resume"] else "--no-resume"


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


@functools.cache
def checkpoint_sha256(path):
    """SHA-256 of a configured FP checkpoint: a param, so other bytes at the same path (even with an older
    mtime, e.g. `cp -p`) rerun fp_model and everything below it."""
    return sha256_file(path)


def fp_checkpoint_entry(wildcards):
    """The config's fp_model.checkpoints entry for this dataset/arch, as written (None: train)."""
    return config["fp_model"]["checkpoints"].get(f"{wildcards.dataset}/{wildcards.arch}")


def fp_params(wildcards):
    """The FP recipe with the checkpoint as the config writes it (the file's SHA-256 is a param too,
    fp_checkpoint_sha). With the working directory outside the checkout, the job's input is the checkout's file by
    its absolute path, so moving the checkout reruns fp_model and everything below it (same weights, same
    results; `--rerun-triggers mtime params` skips that)."""
    fp = {k: v for k, v in config["fp_model"].items() if k != "checkpoints"}
    fp["checkpoint"] = fp_checkpoint_entry(wildcards)
    return canonical_json(fp)


def fp_checkpoint_input(wildcards):
    """The configured FP checkpoint file, resolved (config.resolve_checkpoint), or none: train."""
    path = fp_checkpoint_entry(wildcards)
    return [str(resolve_checkpoint(path, ".", REPO_DIR))] if path else []


def fp_checkpoint_sha(wildcards):
    return "".join(checkpoint_sha256(path) for path in fp_checkpoint_input(wildcards))


def quant_params(wildcards):
    overrides = VARIANTS.get(wildcards.method, {}).get("quant", {})
    return canonical_json({**config["quant"], **overrides})


def base_method(name):
    """A method name, or a variant's base method (config `variants`)."""
    return VARIANTS[name]["method"] if name in VARIANTS else name


def method_base(wildcards):
    return base_method(wildcards.method)


def method_config(name):
    """The `methods.<base>` config of a method or variant, with the variant's overrides."""
    overrides = VARIANTS.get(name, {}).get("methods", {})
    return {**config["methods"].get(base_method(name), {}), **overrides}


def method_params(wildcards):
    return canonical_json(method_config(wildcards.method))


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


def fixed_input_seed(method, key):
    """A variant's fixed seed for its samples (`key` "samples_seed") or generator warm-up ("warmup_seed"):
    that key, else its `inputs_seed`; None: its cells read the inputs of their own seed."""
    variant = VARIANTS.get(method, {})
    return variant.get(key) if variant.get(key) is not None else variant.get("inputs_seed")


def input_seed(wildcards, key):
    """The seed of the samples ("samples_seed") or generator warm-up ("warmup_seed") a cell reads."""
    fixed = fixed_input_seed(wildcards.method, key)
    return wildcards.seed if fixed is None else fixed


def samples_input(wildcards):
    """The synthetic-sample folder a method trains on (same dataset, arch and seed), if any."""
    name = sample_set(wildcards.method)
    if name is None:
        return []
    seed = input_seed(wildcards, "samples_seed")
    return [f"{RESULTS}/samples/{wildcards.dataset}/{wildcards.arch}/{name}/seed{seed}"]


def samples_flag(wildcards, input):
    return f"--samples {input.samples}" if input.samples else ""


def inputs_seed_flag(wildcards, input):  # `input`: not a params rerun trigger (the input paths are)
    """quantize --inputs-seed / --samples-seed / --warmup-seed for a variant that fixes its inputs' seeds."""
    variant = VARIANTS.get(wildcards.method, {})
    return " ".join(f"--{key.replace('_', '-')} {variant[key]}" for key in ("inputs_seed", "samples_seed", "warmup_seed")
                    if variant.get(key) is not None)


def method_warmup_spec(method):
    """The generator warm-up a method (or variant) replays (zsqpipe/warmups.py), or None."""
    return warmup_spec(base_method(method), method_config(method))


# every warm-up a configured method or variant can ask for, by folder name (<kind>@<hash of its settings>)
WARMUP_SPECS = {
    warmup_tag(spec): spec
    for spec in map(method_warmup_spec, [*METHOD_NAMES, *VARIANTS])
    if spec is not None
}


def warmup_input(wildcards):
    """The recorded generator warm-up of a cell (same dataset, arch and seed), if its method has one and it
    is small enough to share (config generator_warmup_max_mb); else the cell trains its generator itself."""
    spec = method_warmup_spec(wildcards.method)
    if spec is None:
        return []
    if record_mb(spec, DATASET_INPUT_SHAPES[wildcards.dataset]) > config["generator_warmup_max_mb"]:
        if fixed_input_seed(wildcards.method, "warmup_seed") is not None:
            raise ConfigError(f"config key 'variants.{wildcards.method}.inputs_seed' / 'warmup_seed': the cell "
                              "trains its generator itself (its warm-up record exceeds generator_warmup_max_mb), so "
                              "its warm-up cannot be fixed")
        return []
    folder = f"{RESULTS}/generators/{wildcards.dataset}/{wildcards.arch}/{warmup_tag(spec)}"
    return [f"{folder}/seed{input_seed(wildcards, 'warmup_seed')}.pt"]


def lr_reference_input(wildcards):
    """The history.json of the TALR cell an LR-matched control matches (methods.real.latent_lr_from): the same
    dataset, arch, bits and seed with the named method or variant."""
    ref = method_config(wildcards.method).get("latent_lr_from")
    if ref is None:
        return []
    talr = method_config(ref).get("talr") if ref in METHOD_NAMES or ref in VARIANTS else None
    if talr is None or talr.get("scope", "layer") != "layer":
        raise ConfigError(f"config key 'methods.latent_lr_from' of {wildcards.method!r}: {ref!r} is not a method or "
                          "variant with methods.talr set and scope layer (the per-layer TALR run to match)")
    return [os.path.join(QUANT_DIR.format(**{**dict(wildcards.items()), "method": ref}), "history.json")]


def lr_reference_flag(wildcards, input):
    return f"--lr-reference {input.lr_reference}" if input.lr_reference else ""


def warmup_flag(wildcards, input):
    return f"--warmup {input.warmup}" if input.warmup else ""


def warmup_params(wildcards):
    return canonical_json(WARMUP_SPECS[wildcards.warmup])


def warmup_code(wildcards):
    kind = wildcards.warmup.split("@")[0]
    return code_version("zsqpipe.stages.warmup", *([f"zsqpipe.methods.{kind}"] if kind != "calib" else []))


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
            "weight_bits": int(wildcards.weight_bits),
            "act_bits": int(wildcards.act_bits),
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


def table_reference(wildcards):
    ref = config["tables"][wildcards.table].get("reference")
    if ref is None:
        return ""
    if ref not in config["tables"][wildcards.table]["methods"]:
        raise ConfigError(f"config key 'tables.{wildcards.table}.reference': {ref!r} is not one of its methods")
    return f"--reference {ref}"


def table_cell_files(t, filename):
    """``filename`` in the folder of every cell of results table ``t`` (datasets x archs x methods x bits x
    seeds), in that order."""
    return [
        f"{RESULTS}/quant/{dataset}/{arch}/{method}/w{w}a{a}/seed{seed}/{filename}"
        for dataset in config["datasets"]
        for arch in t["archs"]
        for method in t["methods"]
        for w, a in map(parse_bits, t["bits"])
        for seed in t["seeds"]
    ]


def table_metrics(wildcards):
    """metrics.json of every cell of a results table."""
    return table_cell_files(config["tables"][wildcards.table], "metrics.json")


# ---- Tabular NAS (workflow/rules/nas.smk): search results and the nas table ----
NAS = config["nas"]
NAS_BENCHMARK_SHA = sha256_file(NAS_BENCHMARK)[:16]
NAS_RESULT = f"{RESULTS}/nas/{{space}}/{{dataset}}/{{strategy}}.json"  # one record per seed of nas.seeds


def nas_strategy_params(strategy):
    """A strategy's settings: nas.params.<strategy>; ase_plus = ase's settings + its own (init_from is the
    workflow's business: it becomes an input file, not a strategy setting)."""
    params = dict(NAS["params"].get(strategy, {}))
    if strategy == "ase_plus":
        params = {**NAS["params"]["ase"], **params}
        params.pop("init_from", None)
        params.pop("init_from_by_dataset", None)
    return params


def nas_params(wildcards):
    return canonical_json(nas_strategy_params(wildcards.strategy))


def ase_plus_source(dataset):
    """The search that seeds ase_plus on ``dataset``: nas.params.ase_plus.init_from_by_dataset[dataset], else
    init_from (default: the CIFAR-10 ASE graph seeds every dataset); None = no seeding. A chain of ase_plus
    searches (the official CIFAR-10 ase -> CIFAR-100 ase_plus -> ImageNet16-120 ase_plus) must end at another
    strategy."""
    params = NAS["params"]["ase_plus"]

    def source(d):
        return (params.get("init_from_by_dataset") or {}).get(d) or params.get("init_from")

    src, seen = source(dataset), [dataset]
    step = src
    while step and step["strategy"] == "ase_plus":
        if step["dataset"] in seen:
            raise ConfigError(f"config key 'nas.params.ase_plus.init_from': ase_plus on {dataset!r} seeds itself "
                              f"(through {' -> '.join(seen + [step['dataset']])})")
        seen.append(step["dataset"])
        step = source(step["dataset"])
    return src


def nas_init_input(wildcards):
    """ase_plus with nas.params.ase_plus.init_from: the seeding search's result file (same space; the stage
    takes the record of each seed from it)."""
    src = ase_plus_source(wildcards.dataset) if wildcards.strategy == "ase_plus" else None
    if not src:
        return []
    return [NAS_RESULT.format(space=wildcards.space, dataset=src["dataset"], strategy=src["strategy"])]


def nas_init_flag(wildcards, input):
    return f"--init-from {input.init}" if input.init else ""


def nas_code(wildcards):
    return code_version("zsqpipe.stages.search", f"zsqpipe.nas.strategies.{wildcards.strategy}")


NAS_SEEDS = ",".join(str(s) for s in NAS["seeds"])


def nas_results(wildcards):
    return [
        NAS_RESULT.format(space=NAS["space"], dataset=d, strategy=s)
        for d in NAS["datasets"]
        for s in NAS["strategies"]
    ]


# ---- NB201 supernet (workflow/rules/supernet.smk): ground truth, supernets, results/tables/supernet.csv ----
SUPERNET = config["supernet"]
GT_RESULT = f"{RESULTS}/nas/groundtruth/{{dataset}}/chunk{{chunk}}.json"
SUPERNET_DIR = f"{RESULTS}/nas/supernet/{{dataset}}/{{method}}/seed{{seed}}"


def groundtruth_config(dataset):
    """supernet.groundtruth for one dataset: the sample keys only for a NAS-Bench-201 table dataset (nothing
    is trained, so the training recipe must not rerun it), else the recipe plus the supernet's C and N."""
    gt = SUPERNET["groundtruth"]
    if dataset in TABLE_OF_DATASET:
        return {k: gt[k] for k in SAMPLE_KEYS}
    return {**gt, "C": SUPERNET["train"]["C"], "N": SUPERNET["train"]["N"]}


def groundtruth_params(wildcards):
    return canonical_json(groundtruth_config(wildcards.dataset))


@functools.cache
def groundtruth_chunks(dataset):
    """Number of groundtruth jobs of a dataset: 1 for a table dataset, else ceil(sample size / chunk_size).
    The table is read only when num_archs is null (the sample is then the whole Kendall subset)."""
    if dataset in TABLE_OF_DATASET:
        return 1
    gt = SUPERNET["groundtruth"]
    n = gt["num_archs"]
    if n is None:
        n = len(kendall_sample(None, gt["sample_seed"], gt["exclude_disconnected"]))
    return -(-n // gt["chunk_size"])


def groundtruth_data_input(wildcards):
    """Cells are trained on the dataset unless the NB201 table has its ground truth."""
    if wildcards.dataset in TABLE_OF_DATASET:
        return []
    return [f"{RESULTS}/data/{wildcards.dataset}/manifest.json"]


def groundtruth_data_flag(wildcards, input):
    return f"--data {input.data}" if input.data else ""


def groundtruth_device(wildcards):
    return "cpu" if wildcards.dataset in TABLE_OF_DATASET else config["device"]


def groundtruth_gpus(wildcards):
    return 0 if wildcards.dataset in TABLE_OF_DATASET else gpus()


def groundtruth_files(wildcards):
    return [
        GT_RESULT.format(dataset=wildcards.dataset, chunk=k) for k in range(groundtruth_chunks(wildcards.dataset))
    ]


def supernet_variant(name):
    """(base method, SupernetConfig overrides) of a supernet.methods entry: spos / spos_calr_ms, or a name of
    supernet.variants."""
    if name in SUPERNET_METHOD_NAMES:
        return name, {}
    if name not in SUPERNET["variants"]:
        raise ConfigError(f"config key 'supernet.methods': {name!r} is neither {list(SUPERNET_METHOD_NAMES)} "
                          f"nor a supernet.variants name {sorted(SUPERNET['variants'])}")  # fmt: skip
    v = SUPERNET["variants"][name]
    return v["method"], {k: x for k, x in v.items() if k != "method"}


try:
    for _name in SUPERNET["methods"]:
        supernet_variant(_name)
except ConfigError as _err:
    sys.exit(f"zsqpipe: invalid config: {_err}")
SUPERNET_METHODS = "|".join(list(SUPERNET_METHOD_NAMES) + sorted(SUPERNET["variants"]))  # wildcard constraint


def supernet_params(wildcards):
    return canonical_json({**SUPERNET["train"], **supernet_variant(wildcards.method)[1]})


def supernet_base_method(wildcards):
    return supernet_variant(wildcards.method)[0]


SUPERNET_SEARCH = f"{RESULTS}/nas/supernet_search/{{dataset}}/{{method}}/seed{{seed}}/{{strategy}}.json"


def supernet_search_params(wildcards):
    return canonical_json({k: v for k, v in SUPERNET["search"].items() if k not in ("strategies", "supernets")})


def supernet_search_gt_params(wildcards):
    """The stand-alone recipe of the found cells (supernet.groundtruth + the supernet's C, N), or "" (no
    stand-alone training; a NAS-Bench-201 dataset reads the found cells' accuracy from the table)."""
    if not SUPERNET["search"]["standalone"] or wildcards.dataset in TABLE_OF_DATASET:
        return ""
    return groundtruth_params(wildcards)


def supernet_search_code(wildcards):
    return code_version("zsqpipe.stages.supernet_search", f"zsqpipe.nas.strategies.{wildcards.strategy}")


def searched_supernets():
    """supernet.search.supernets (null: every supernet method), each checked against supernet.methods."""
    chosen = SUPERNET["search"].get("supernets") or SUPERNET["methods"]
    for m in chosen:
        if m not in SUPERNET["methods"]:
            raise ConfigError(f"config key 'supernet.search.supernets': {m!r} is not one of supernet.methods "
                              f"{list(SUPERNET['methods'])}")
    return chosen


def supernet_searches(wildcards):
    return [
        SUPERNET_SEARCH.format(dataset=d, method=m, seed=s, strategy=st)
        for d in SUPERNET["datasets"]
        for m in searched_supernets()
        for s in SUPERNET["seeds"]
        for st in SUPERNET["search"]["strategies"]
    ]


def supernet_search_groundtruth(wildcards):
    return [GT_RESULT.format(dataset=d, chunk=k) for d in SUPERNET["datasets"] for k in range(groundtruth_chunks(d))]


def supernet_metrics(wildcards):
    return [
        f"{SUPERNET_DIR}/metrics.json".format(dataset=d, method=m, seed=s)
        for d in SUPERNET["datasets"]
        for m in SUPERNET["methods"]
        for s in SUPERNET["seeds"]
    ]


# ---- Report figures (workflow/rules/report.smk): results/plots/*.png ----
PLOTS = f"{RESULTS}/plots"
PLOT_STYLE = {"dpi": 120}  # zsqpipe.plots.DEFAULT_STYLE keys: dpi, width, height (inches per panel)


def table_plot_kind(table):
    """The table's `plot` (bits, bars, steps); `auto`: a table over several bit-widths is drawn as accuracy vs
    bit-width, one at a single bit-width (an ablation such as hast_ablation, or lbt) as bars per method/variant."""
    kind = config["tables"][table].get("plot", "auto")
    if kind != "auto":
        return kind
    return "bits" if len(config["tables"][table]["bits"]) > 1 else "bars"


def table_method_configs(wildcards):
    """{method or variant: {"method": base, "cfg": its methods.<base> config with the variant's overrides}}
    of a table (the steps figure reads each run's student steps from these)."""
    names = config["tables"][wildcards.table]["methods"]
    return canonical_json({n: {"method": base_method(n), "cfg": method_config(n)} for n in names})


def table_plots():
    return [f"{PLOTS}/{t}_{table_plot_kind(t)}.png" for t in config["tables"]]


def nas_curve_plots():
    return [f"{PLOTS}/nas_curves_{d}.png" for d in NAS["datasets"]]


def table_order(wildcards):
    return ",".join(config["tables"][wildcards.table]["methods"])


def nas_curve_inputs(wildcards):
    return [NAS_RESULT.format(space=NAS["space"], dataset=wildcards.dataset, strategy=s) for s in NAS["strategies"]]


# ---- integer deployment (deploy.smk) ----
DEPLOY = config["deploy"]


def deploy_table_config():
    """The results table whose cells deploy.csv covers (config deploy.table), checked when it is requested."""
    name = DEPLOY["table"]
    if name not in config["tables"]:
        raise ConfigError(f"config key 'deploy.table': {name!r} is not a table {sorted(config['tables'])}")
    t = config["tables"][name]
    if DEPLOY["latency"]["method"] not in t["methods"]:
        raise ConfigError(
            f"config key 'deploy.latency.method': {DEPLOY['latency']['method']!r} is not a method of table "
            f"{name!r} {t['methods']}"
        )
    return t


def deploy_cell_files(filename):
    """``filename`` (deploy.json / export.json) of every cell of the deploy table, in the same order."""
    return table_cell_files(deploy_table_config(), filename)


def deploy_latency_files():
    t = deploy_table_config()
    return [
        f"{RESULTS}/deploy/{dataset}/{arch}/w{w}a{a}/latency.json"
        for dataset in config["datasets"]
        for arch in t["archs"]
        for w, a in map(parse_bits, t["bits"])
    ]


def deploy_latency_inputs(wildcards):
    """The timed cell of a (dataset, arch, bits): config deploy.latency's method and seed."""
    lat = DEPLOY["latency"]
    bits = f"w{wildcards.weight_bits}a{wildcards.act_bits}"
    cell = os.path.join(RESULTS, "quant", wildcards.dataset, wildcards.arch, lat["method"], bits, f"seed{lat['seed']}")
    return {"model": f"{cell}/model.pt", "onnx": f"{cell}/model.onnx", "fp32": f"{cell}/model_fp32.onnx"}


def deploy_latency_key(wildcards):
    lat = DEPLOY["latency"]
    key = {"dataset": wildcards.dataset, "arch": wildcards.arch, "weight_bits": int(wildcards.weight_bits),
           "act_bits": int(wildcards.act_bits), "method": lat["method"], "seed": lat["seed"]}  # fmt: skip
    return canonical_json(key)
