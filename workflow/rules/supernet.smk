# NB201 weight-sharing supernet (issue 4 item 3; docs/methods/supernet.md): ground truth of a fixed sample of
# Kendall-subset cells (trained stand-alone in chunks, or read from the NAS-Bench-201 table for CIFAR), one
# supernet per dataset x method x seed ranked against it, then results/tables/supernet.csv.
# Helpers (params, inputs, paths): workflow/rules/common.smk.


rule groundtruth:
    input:
        tracking=ancient(TRACKING),
        data=groundtruth_data_input,
    output:
        GT_RESULT,
    wildcard_constraints:
        dataset="fashion_mnist|cifar10|cifar100",
        chunk=r"\d+",
    params:
        cfg=groundtruth_params,
        data=groundtruth_data_flag,
        device=groundtruth_device,
        benchmark=NAS_BENCHMARK_SHA,
        code=code_version("zsqpipe.stages.groundtruth"),
    log:
        f"{LOGS}/groundtruth/{{dataset}}/chunk{{chunk}}.log",
    benchmark:
        f"{BENCH}/groundtruth/{{dataset}}/chunk{{chunk}}.tsv"
    threads: 1  # small networks: two single-thread jobs use 2 cores better than one 2-thread job
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=groundtruth_gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe groundtruth --dataset {wildcards.dataset} --chunk {wildcards.chunk} {params.data}"
        " --params {params.cfg:q} --out {output} --device {params.device} --threads {threads}"
        " --tracking {input.tracking} --rule groundtruth --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule supernet_train:
    input:
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
        groundtruth=groundtruth_files,
    output:
        model=f"{SUPERNET_DIR}/supernet.pt",
        history=f"{SUPERNET_DIR}/history.json",
        metrics=f"{SUPERNET_DIR}/metrics.json",
    wildcard_constraints:
        dataset="fashion_mnist|cifar10|cifar100",
        method=SUPERNET_METHODS,
        seed=r"\d+",
    params:
        cfg=supernet_params,
        base=supernet_base_method,
        device=config["device"],
        code=code_version("zsqpipe.stages.supernet_train"),
    log:
        f"{LOGS}/supernet_train/{{dataset}}/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/supernet_train/{{dataset}}/{{method}}/seed{{seed}}.tsv"
    threads: 1  # as groundtruth; GPU jobs are serialised by the `gpu` resource
    resources:
        mem_mb=8000,
        runtime=720,  # paper budget (250 epochs, C=16, N=5): DYNAS reports 2.7 GPU-hours on an RTX 2080 Ti
        gpu=gpus,
        resume=RESUME,  # a run-time setting like threads, not a param: see common.smk
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe supernet-train {input.groundtruth} --data {input.data} --method {params.base}"
        " --label {wildcards.method}"
        " --seed {wildcards.seed} --params {params.cfg:q} --out-model {output.model}"
        " --out-history {output.history} --out-metrics {output.metrics} --device {params.device}"
        " --threads {threads} {resources.resume} --tracking {input.tracking} --rule supernet_train"
        " --wildcards '{wildcards}'"
        " --log-file {log} > {log} 2>&1"


rule supernet_table:
    input:
        metrics=supernet_metrics,
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/supernet.csv",
        md=f"{RESULTS}/tables/supernet.md",
    params:
        title=SUPERNET["title"],
        paper=canonical_json(SUPERNET["paper"]),
        code=code_version("zsqpipe.stages.supernet_table"),
    log:
        f"{LOGS}/supernet_table.log",
    benchmark:
        f"{BENCH}/supernet_table.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe supernet-table {input.metrics} --out-csv {output.csv} --out-md {output.md}"
        " --title {params.title:q} --paper {params.paper:q} --tracking {input.tracking}"
        " --rule supernet_table --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule supernet_search:
    input:
        supernet=f"{SUPERNET_DIR}/supernet.pt",
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
    output:
        SUPERNET_SEARCH,
    wildcard_constraints:
        dataset="fashion_mnist|cifar10|cifar100",
        method=SUPERNET_METHODS,
        seed=r"\d+",
        strategy="random|rea|reinforce|ase",
    params:
        cfg=supernet_search_params,
        strategy=lambda w: canonical_json(nas_strategy_params(w.strategy)),
        gt=supernet_search_gt_params,
        device=config["device"],
        code=supernet_search_code,
    log:
        f"{LOGS}/supernet_search/{{dataset}}/{{method}}/seed{{seed}}/{{strategy}}.log",
    benchmark:
        f"{BENCH}/supernet_search/{{dataset}}/{{method}}/seed{{seed}}/{{strategy}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe supernet-search {input.supernet} --data {input.data} --strategy {wildcards.strategy}"
        " --params {params.cfg:q} --strategy-params {params.strategy:q} --groundtruth-params {params.gt:q}"
        " --out {output} --device {params.device} --threads {threads} --tracking {input.tracking}"
        " --rule supernet_search --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule supernet_search_table:
    input:
        searches=supernet_searches,
        groundtruth=supernet_search_groundtruth,
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/supernet_search.csv",
        md=f"{RESULTS}/tables/supernet_search.md",
    params:
        gt=lambda w, input: " ".join(f"--groundtruth {p}" for p in input.groundtruth),
        code=code_version("zsqpipe.stages.supernet_search"),
    log:
        f"{LOGS}/supernet_search_table.log",
    benchmark:
        f"{BENCH}/supernet_search_table.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe supernet-search-table {input.searches} {params.gt} --out-csv {output.csv}"
        " --out-md {output.md} --tracking {input.tracking} --rule supernet_search_table"
        " --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


ruleorder: supernet_search_table > aggregate  # a config table named "supernet_search" would match aggregate
ruleorder: supernet_table > aggregate  # a config table named "supernet" would also match aggregate's output
