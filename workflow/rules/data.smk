# MLflow store/experiment initialisation and dataset preparation.


rule mlflow_init:
    output:
        TRACKING,
    params:
        experiment=config["experiment"],
        uri=tracking_uri(),
        flag="--enabled" if config["tracking"] else "--disabled",
    log:
        f"{LOGS}/mlflow_init.log",
    benchmark:
        f"{BENCH}/mlflow_init.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe tracking-init --out {output} --experiment {params.experiment:q} {params.flag} > {log} 2>&1"


rule data:
    input:
        tracking=ancient(TRACKING),
    output:
        f"{RESULTS}/data/{{dataset}}/manifest.json",
    params:
        cfg=data_params,
        code=code_version("zsqpipe.stages.data"),
    log:
        f"{LOGS}/data/{{dataset}}.log",
    benchmark:
        f"{BENCH}/data/{{dataset}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe data --dataset {wildcards.dataset} --params {params.cfg:q} --out {output}"
        " --tracking {input.tracking} --rule data --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"
