# Data-free sample synthesis from the FP model (no real data is read), written as verified Parquet shards.


rule synthesize:
    input:
        fp=f"{RESULTS}/models/{{dataset}}/{{arch}}/fp.pt",
        tracking=ancient(TRACKING),
    output:
        directory(f"{RESULTS}/samples/{{dataset}}/{{arch}}/{{synth}}/seed{{seed}}"),
    params:
        synthesizer=synthesizer,
        cfg=synth_params,
        device=config["device"],
        code=synth_code,
    log:
        f"{LOGS}/synthesize/{{dataset}}/{{arch}}/{{synth}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/synthesize/{{dataset}}/{{arch}}/{{synth}}/seed{{seed}}.tsv"
    threads: 1  # benchmarks/bench_threads.py: two 1-thread synthesis jobs do 1.33x the steps of one 2-thread job
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe synthesize --fp {input.fp} --synthesizer {params.synthesizer} --seed {wildcards.seed}"
        " --params {params.cfg:q} --out {output} --device {params.device} --threads {threads}"
        " --tracking {input.tracking} --rule synthesize --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


# A generator trained on the FP model alone (GDFQ/Qimera warm-up epochs, HAST/IntraQ range calibration), recorded
# once per (settings, seed) and replayed by every cell that needs it, whatever its bit width (zsqpipe/warmups.py).
rule generator_warmup:
    input:
        fp=f"{RESULTS}/models/{{dataset}}/{{arch}}/fp.pt",
        tracking=ancient(TRACKING),
    output:
        f"{RESULTS}/generators/{{dataset}}/{{arch}}/{{warmup}}/seed{{seed}}.pt",
    params:
        spec=warmup_params,
        device=config["device"],
        code=warmup_code,
    log:
        f"{LOGS}/generator_warmup/{{dataset}}/{{arch}}/{{warmup}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/generator_warmup/{{dataset}}/{{arch}}/{{warmup}}/seed{{seed}}.tsv"
    threads: 1
    priority: 1  # the cells of every bit width wait for it
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe generator-warmup --fp {input.fp} --spec {params.spec:q} --seed {wildcards.seed}"
        " --out {output} --device {params.device} --threads {threads}"
        " --tracking {input.tracking} --rule generator_warmup --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"
