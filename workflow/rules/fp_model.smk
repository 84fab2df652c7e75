# Full-precision model: train from scratch or load a local checkpoint.


rule fp_model:
    input:
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
        checkpoint=fp_checkpoint_input,
    output:
        model=f"{RESULTS}/models/{{dataset}}/{{arch}}/fp.pt",
        metrics=f"{RESULTS}/models/{{dataset}}/{{arch}}/fp_metrics.json",
    params:
        cfg=fp_params,
        checkpoint_sha256=fp_checkpoint_sha,
        device=config["device"],
        code=code_version("zsqpipe.stages.fp_model"),
    log:
        f"{LOGS}/fp_model/{{dataset}}/{{arch}}.log",
    benchmark:
        f"{BENCH}/fp_model/{{dataset}}/{{arch}}.tsv"
    threads: 2  # runs alone at the top of the DAG; with a second job beside it 2 x 1 thread gains only 5 % (bench_threads.py)
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus,
        resume=RESUME,  # a run-time setting like threads, not a param: see common.smk
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe fp-model --data {input.data} --arch {wildcards.arch} --params {params.cfg:q}"
        " --checkpoint '{input.checkpoint}' --out-model {output.model} --out-metrics {output.metrics} --device {params.device}"
        " --threads {threads} {resources.resume} --tracking {input.tracking} --rule fp_model --wildcards '{wildcards}'"
        " --log-file {log} > {log} 2>&1"
