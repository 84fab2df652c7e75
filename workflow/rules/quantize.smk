# Quantization (method calibration / fine-tuning) and evaluation of one table cell.


rule quantize:
    input:
        fp=f"{RESULTS}/models/{{dataset}}/{{arch}}/fp.pt",
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
        samples=samples_input,
        warmup=warmup_input,
        lr_reference=lr_reference_input,
    output:
        model=f"{QUANT_DIR}/model.pt",
        history=f"{QUANT_DIR}/history.json",
    params:
        quant=quant_params,
        base=method_base,
        method=method_params,
        samples=samples_flag,
        warmup=warmup_flag,
        lr_reference=lr_reference_flag,
        inputs_seed=inputs_seed_flag,
        device=config["device"],
        code=quantize_code,
    log:
        f"{LOGS}/quantize/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/quantize/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.tsv"
    threads: 1  # several small jobs in parallel use a CPU better than one job with many threads
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus,
        resume=RESUME,  # a run-time setting like threads, not a param: see common.smk
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe quantize --fp {input.fp} --data {input.data} --method {params.base}"
        " --weight-bits {wildcards.weight_bits} --act-bits {wildcards.act_bits} --seed {wildcards.seed}"
        " --quant-params {params.quant:q} --method-params {params.method:q} {params.samples} {params.warmup}"
        " {params.lr_reference} {params.inputs_seed}"
        " --out-model {output.model} --out-history {output.history} --device {params.device}"
        " --threads {threads} {resources.resume} --tracking {input.tracking} --rule quantize --wildcards '{wildcards}'"
        " --log-file {log} > {log} 2>&1"


rule evaluate:
    input:
        model=f"{QUANT_DIR}/model.pt",
        history=f"{QUANT_DIR}/history.json",
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
    output:
        f"{QUANT_DIR}/metrics.json",
    params:
        cell=cell_json,
        device=config["device"],
        code=code_version("zsqpipe.stages.evaluate"),
    log:
        f"{LOGS}/evaluate/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe evaluate --model {input.model} --history {input.history} --data {input.data}"
        " --cell {params.cell:q} --out {output} --device {params.device} --threads {threads}"
        " --tracking {input.tracking} --rule evaluate --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"
