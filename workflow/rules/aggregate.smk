# Result tables, built from metrics files only.


rule aggregate_hast:
    input:
        metrics=table_metrics("hast"),
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/hast.csv",
        md=f"{RESULTS}/tables/hast.md",
    params:
        paper=canonical_json(config["tables"]["hast"]["paper"]),
        code=code_version("zsqpipe.stages.aggregate"),
    log:
        f"{LOGS}/aggregate/hast.log",
    benchmark:
        f"{BENCH}/aggregate/hast.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe aggregate {input.metrics} --out-csv {output.csv} --out-md {output.md}"
        " --title 'HAST table: zero-shot quantization' --paper {params.paper:q} --tracking {input.tracking}"
        " --rule aggregate_hast"
        " --log-file {log} > {log} 2>&1"
