# Report figures (issue 6 item 5): results/plots/*.png, each a report() output with a caption in
# workflow/report/. `snakemake --cores 2 plots` builds every figure the config implies (its tables and NAS
# searches: hours with the default config), then `snakemake --report report.html plots` writes the
# self-contained HTML report. Other rule files add their own report() outputs (e.g. the OQAT Pareto front);
# a report includes every report() output of the DAG of the targets it is given. Plots are cheap: local rules.
# The figures are drawn by zsqpipe/plots.py (`zsqpipe plot`); helpers (targets, inputs): common.smk.


rule plot_bits:
    input:
        csv=f"{RESULTS}/tables/{{table}}.csv",
    output:
        report(
            f"{PLOTS}/{{table}}_bits.png",
            caption="../report/bits.rst",
            category="Quantization accuracy",
            subcategory="{table}",
            labels={"table": "{table}", "figure": "accuracy vs bit-width"},
        ),
    params:
        title=table_title,
        order=table_order,
        style=canonical_json(PLOT_STYLE),
        code=code_version("zsqpipe.plots"),
    log:
        f"{LOGS}/plot/{{table}}_bits.log",
    benchmark:
        f"{BENCH}/plot/{{table}}_bits.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe plot --kind bits {input.csv} --out {output} --title {params.title:q}"
        " --order {params.order:q} --style {params.style:q} > {log} 2>&1"


rule plot_bars:
    input:
        csv=f"{RESULTS}/tables/{{table}}.csv",
    output:
        report(
            f"{PLOTS}/{{table}}_bars.png",
            caption="../report/bars.rst",
            category="Quantization accuracy",
            subcategory="{table}",
            labels={"table": "{table}", "figure": "bars per method/variant"},
        ),
    params:
        title=table_title,
        order=table_order,
        style=canonical_json(PLOT_STYLE),
        code=code_version("zsqpipe.plots"),
    log:
        f"{LOGS}/plot/{{table}}_bars.log",
    benchmark:
        f"{BENCH}/plot/{{table}}_bars.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe plot --kind ablation {input.csv} --out {output} --title {params.title:q}"
        " --order {params.order:q} --style {params.style:q} > {log} 2>&1"


rule plot_steps:
    input:
        csv=f"{RESULTS}/tables/{{table}}.csv",
    output:
        report(
            f"{PLOTS}/{{table}}_steps.png",
            caption="../report/steps.rst",
            category="Quantization accuracy",
            subcategory="{table}",
            labels={"table": "{table}", "figure": "accuracy vs fine-tuning steps"},
        ),
    params:
        title=table_title,
        order=table_order,
        methods=table_method_configs,
        style=canonical_json(PLOT_STYLE),
        code=code_version("zsqpipe.plots", "zsqpipe.budget"),
    log:
        f"{LOGS}/plot/{{table}}_steps.log",
    benchmark:
        f"{BENCH}/plot/{{table}}_steps.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe plot --kind steps {input.csv} --out {output} --title {params.title:q}"
        " --order {params.order:q} --methods {params.methods:q} --style {params.style:q} > {log} 2>&1"


rule plot_nas_curves:
    input:
        results=nas_curve_inputs,
    output:
        report(
            f"{PLOTS}/nas_curves_{{dataset}}.png",
            caption="../report/nas_curves.rst",
            category="NAS search",
            labels={"dataset": "{dataset}", "figure": "best validation accuracy vs queries"},
        ),
    wildcard_constraints:
        dataset="|".join(NAS_DATASETS),
    params:
        title=lambda wildcards: f"NAS-Bench-201 search on {wildcards.dataset}: best validation accuracy found",
        order=",".join(NAS["strategies"]),
        style=canonical_json(PLOT_STYLE),
        benchmark=NAS_BENCHMARK_SHA,
        code=code_version("zsqpipe.plots"),
    log:
        f"{LOGS}/plot/nas_curves_{{dataset}}.log",
    benchmark:
        f"{BENCH}/plot/nas_curves_{{dataset}}.tsv"
    localrule: True
    conda:
        "../envs/zsqpipe.yaml"
    shell:
        "python3 -m zsqpipe plot --kind nas_curves {input.results} --out {output} --title {params.title:q}"
        " --order {params.order:q} --style {params.style:q} > {log} 2>&1"


rule plots:
    input:
        table_plots(),
        nas_curve_plots(),
        f"{RESULTS}/plots/oqat_pareto.png" if config["oqat"]["datasets"] else [],
    localrule: True
