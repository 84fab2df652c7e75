# Integer deployment (docs/deploy.md): export each cell of one results table to ONNX, run it in onnxruntime
# on integer kernels, time one cell per dataset/arch/bits, and build results/tables/deploy.csv.


rule export:
    input:
        model=f"{QUANT_DIR}/model.pt",
        tracking=ancient(TRACKING),
    output:
        onnx=f"{QUANT_DIR}/model.onnx",
        fp32=f"{QUANT_DIR}/model_fp32.onnx",
        report=f"{QUANT_DIR}/export.json",
    params:
        mode=DEPLOY["mode"],
        code=code_version("zsqpipe.stages.deploy"),
    log:
        f"{LOGS}/export/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/export/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe export --model {input.model} --out {output.onnx} --out-fp32 {output.fp32}"
        " --report {output.report} --mode {params.mode} --dataset {wildcards.dataset} --tracking {input.tracking} --rule export"
        " --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule deploy_eval:
    input:
        model=f"{QUANT_DIR}/model.pt",
        onnx=f"{QUANT_DIR}/model.onnx",
        data=f"{RESULTS}/data/{{dataset}}/manifest.json",
        tracking=ancient(TRACKING),
    output:
        f"{QUANT_DIR}/deploy.json",
    params:
        cell=cell_json,
        code=code_version("zsqpipe.stages.deploy"),
    log:
        f"{LOGS}/deploy_eval/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.log",
    benchmark:
        f"{BENCH}/deploy_eval/{{dataset}}/{{arch}}/{{method}}/w{{weight_bits}}a{{act_bits}}/seed{{seed}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe deploy-eval --model {input.model} --onnx {input.onnx} --data {input.data}"
        " --cell {params.cell:q} --out {output} --threads {threads} --tracking {input.tracking}"
        " --rule deploy_eval --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"


rule deploy_latency:
    input:
        unpack(deploy_latency_inputs),
        tracking=ancient(TRACKING),
    output:
        f"{RESULTS}/deploy/{{dataset}}/{{arch}}/w{{weight_bits}}a{{act_bits}}/latency.json",
    params:
        key=deploy_latency_key,
        batch_sizes=",".join(str(b) for b in DEPLOY["latency"]["batch_sizes"]),
        threads=",".join(str(t) for t in DEPLOY["latency"]["threads"]),
        runs=DEPLOY["latency"]["runs"],
        code=code_version("zsqpipe.stages.deploy"),
    log:
        f"{LOGS}/deploy_latency/{{dataset}}/{{arch}}/w{{weight_bits}}a{{act_bits}}.log",
    benchmark:
        f"{BENCH}/deploy_latency/{{dataset}}/{{arch}}/w{{weight_bits}}a{{act_bits}}.tsv"
    threads: max(DEPLOY["latency"]["threads"])  # timings at 2 threads need the cores to themselves
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe deploy-latency --model {input.model} --onnx {input.onnx} --onnx-fp32 {input.fp32}"
        " --key {params.key:q} --out {output} --batch-sizes {params.batch_sizes} --thread-counts {params.threads}"
        " --runs {params.runs} --tracking {input.tracking} --rule deploy_latency --wildcards '{wildcards}'"
        " --log-file {log} > {log} 2>&1"


rule deploy_table:
    input:
        deploy=lambda wc: deploy_cell_files("deploy.json"),
        export=lambda wc: deploy_cell_files("export.json"),
        latency=lambda wc: deploy_latency_files(),
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/deploy.csv",
        md=f"{RESULTS}/tables/deploy.md",
    params:
        title=lambda wc: f"Integer deployment of the {DEPLOY['table']} table (onnxruntime, CPU, mode {DEPLOY['mode']})",
        code=code_version("zsqpipe.stages.deploy"),
    log:
        f"{LOGS}/deploy_table.log",
    benchmark:
        f"{BENCH}/deploy_table.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe deploy-table"
        " $(printf -- '--deploy %s ' {input.deploy}) $(printf -- '--export %s ' {input.export})"
        " $(printf -- '--latency %s ' {input.latency}) --out-csv {output.csv} --out-md {output.md}"
        " --title {params.title:q} --tracking {input.tracking} --rule deploy_table --log-file {log} > {log} 2>&1"


rule plot_deploy:
    input:
        csv=f"{RESULTS}/tables/deploy.csv",
    output:
        report(
            f"{PLOTS}/deploy.png",
            caption="../report/deploy.rst",
            category="Integer deployment",
            labels={"figure": "fake-quant vs integer top-1"},
        ),
    params:
        order=lambda wc: ",".join(deploy_table_config()["methods"]),
        style=canonical_json(PLOT_STYLE),
        code=code_version("zsqpipe.plots"),
    log:
        f"{LOGS}/plot/deploy.log",
    benchmark:
        f"{BENCH}/plot/deploy.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe plot --kind deploy {input.csv} --out {output} --order {params.order:q}"
        " --style {params.style:q} > {log} 2>&1"
