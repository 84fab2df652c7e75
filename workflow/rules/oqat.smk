# OQAT on the NB201 space (issue 4 item 4; docs/methods/oqat.md): one LSQ-quantized weight-sharing supernet per
# dataset x bit-width x seed (the first bit-width of oqat.bits from LSQ init, each next one by bit inheritance
# from the previous, fine-tuned with oqat.finetune), a BitOPs-constrained search on each, then
# results/tables/oqat.csv (+ .md, oqat_pareto.csv) and results/plots/oqat_pareto.png.
# Helpers (params, inputs, paths): workflow/rules/oqat_common.smk (RESULTS, LOGS, TRACKING, gpus: common.smk).

include: "oqat_common.smk"


rule oqat_train:
    input:
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
        parent=oqat_parent_input,
    output:
        model=f"{OQAT_DIR}/supernet.pt",
        history=f"{OQAT_DIR}/history.json",
        metrics=f"{OQAT_DIR}/metrics.json",
    wildcard_constraints:
        dataset="fashion_mnist|cifar10|cifar100",
        obits="|".join(str(b) for b in OQAT["bits"]),
        seed=r"\d+",
    params:
        cfg=oqat_train_params,
        inherit=oqat_inherit_flag,
        device=config["device"],
        code=code_version("zsqpipe.stages.oqat_train"),
    log:
        f"{LOGS}/oqat_train/{{dataset}}/w{{obits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/oqat_train/{{dataset}}/w{{obits}}/seed{{seed}}.tsv"
    threads: 1  # small networks: two single-thread jobs (seeds) use 2 cores better than one 2-thread job
    resources:
        mem_mb=4000,
        runtime=240,
        gpu=gpus,
        resume=RESUME,  # a run-time setting like threads, not a param: see common.smk
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe oqat-train --data {input.data} --bits {wildcards.obits} --seed {wildcards.seed}"
        " {params.inherit} --params {params.cfg:q} --out-model {output.model} --out-history {output.history}"
        " --out-metrics {output.metrics} --device {params.device} --threads {threads} {resources.resume}"
        " --tracking {input.tracking}"
        " --rule oqat_train --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule oqat_search:
    input:
        supernet=f"{OQAT_DIR}/supernet.pt",
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
    output:
        f"{OQAT_DIR}/search.json",
    wildcard_constraints:
        dataset="fashion_mnist|cifar10|cifar100",
        obits="|".join(str(b) for b in OQAT["bits"]),
        seed=r"\d+",
    params:
        cfg=canonical_json(OQAT["search"]),
        device=config["device"],
        code=code_version("zsqpipe.stages.oqat_search"),
    log:
        f"{LOGS}/oqat_search/{{dataset}}/w{{obits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/oqat_search/{{dataset}}/w{{obits}}/seed{{seed}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe oqat-search {input.supernet} --data {input.data} --seed {wildcards.seed}"
        " --params {params.cfg:q} --out {output} --device {params.device} --threads {threads}"
        " --tracking {input.tracking} --rule oqat_search --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule oqat_table:
    input:
        searches=oqat_searches,
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/oqat.csv",
        md=f"{RESULTS}/tables/oqat.md",
        pareto=f"{RESULTS}/tables/oqat_pareto.csv",
        plot=report(f"{RESULTS}/plots/oqat_pareto.png", caption="../report/oqat_pareto.rst", category="NAS search"),
    params:
        title=OQAT["title"],
        code=code_version("zsqpipe.stages.oqat_table"),
    log:
        f"{LOGS}/oqat_table.log",
    benchmark:
        f"{BENCH}/oqat_table.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe oqat-table {input.searches} --out-csv {output.csv} --out-md {output.md}"
        " --out-pareto {output.pareto} --out-plot {output.plot} --title {params.title:q}"
        " --tracking {input.tracking} --rule oqat_table --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


ruleorder: oqat_table > aggregate  # a config table named "oqat" would also match aggregate's output
