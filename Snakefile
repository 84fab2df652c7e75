# zsqpipe workflow: FP model -> quantize -> evaluate -> tables. See README.md and config/README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/fp_model.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/nas.smk"
include: "workflow/rules/supernet.smk"
include: "workflow/rules/oqat.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/tables/hast.csv",
