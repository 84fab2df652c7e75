# Tabular NAS on NAS-Bench-201 (issue 4): one job per space x dataset x strategy runs every seed of nas.seeds
# (the searches take seconds; one process per seed would mostly import torch), then results/tables/nas.csv.
# The ground truth ships with the package (zsqpipe/nas/data/); its SHA-256 is a param, so a new table reruns all.
# Helpers (params, inputs, paths): workflow/rules/common.smk.


rule search:
    input:
        tracking=ancient(TRACKING),
        init=nas_init_input,
    output:
        NAS_RESULT,
    wildcard_constraints:
        space="nb201",
        dataset="|".join(NAS_DATASETS),
        strategy="|".join(STRATEGY_NAMES),
    params:
        cfg=nas_params,
        seeds=NAS_SEEDS,
        budget=NAS["budget"],
        init=nas_init_flag,
        benchmark=NAS_BENCHMARK_SHA,
        code=nas_code,
    log:
        f"{LOGS}/search/{{space}}/{{dataset}}/{{strategy}}.log",
    benchmark:
        f"{BENCH}/search/{{space}}/{{dataset}}/{{strategy}}.tsv"
    threads: 1  # table look-ups and a tiny controller: one thread is fastest
    resources:
        mem_mb=2000,
        runtime=60,  # 20 seeds x 200 queries: about 1 min for ASE on one core
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe search --space {wildcards.space} --dataset {wildcards.dataset}"
        " --strategy {wildcards.strategy} --seeds {params.seeds} --budget {params.budget}"
        " --params {params.cfg:q} {params.init} --out {output} --threads {threads}"
        " --tracking {input.tracking} --rule search --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule nas_table:
    input:
        results=nas_results,
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/nas.csv",
        md=f"{RESULTS}/tables/nas.md",
    params:
        title=NAS["title"],
        paper=canonical_json(NAS["paper"]),
        benchmark=NAS_BENCHMARK_SHA,
        code=code_version("zsqpipe.stages.nas_table"),
    log:
        f"{LOGS}/nas_table.log",
    benchmark:
        f"{BENCH}/nas_table.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe nas-table {input.results} --out-csv {output.csv} --out-md {output.md}"
        " --title {params.title:q} --paper {params.paper:q} --tracking {input.tracking}"
        " --rule nas_table --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


ruleorder: nas_table > aggregate  # a config table named "nas" would also match aggregate's output
