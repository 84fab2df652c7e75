# Result tables, built from metrics files only (one per entry of config `tables`).


rule aggregate:
    input:
        metrics=table_metrics,
        tracking=ancient(TRACKING),
    output:
        csv=f"{RESULTS}/tables/{{table}}.csv",
        md=f"{RESULTS}/tables/{{table}}.md",
    params:
        title=table_title,
        paper=table_paper,
        reference=table_reference,
        code=code_version("zsqpipe.stages.aggregate"),
    log:
        f"{LOGS}/aggregate/{{table}}.log",
    benchmark:
        f"{BENCH}/aggregate/{{table}}.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe aggregate {input.metrics} --out-csv {output.csv} --out-md {output.md}"
        " --title {params.title:q} --paper {params.paper:q} {params.reference} --tracking {input.tracking}"
        " --rule aggregate --wildcards '{wildcards}' --log-file {log} > {log} 2>&1"
