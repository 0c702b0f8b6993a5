# mergelaws: how language-model merging scales (arXiv 2509.24244), end to end.
#   snakemake --profile profiles/local            (the embedded default, CPU)
#   snakemake --profile profiles/slurm            (a SLURM cluster)
from snakemake.utils import min_version, validate


min_version("9.0")


report: "report/workflow.rst"


# config.yaml is the default; a --configfile given on the command line replaces it (rather
# than being merged into it, which would leak the default's domains and bases into yours).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# common.smk validates first, with messages naming the key and what is allowed; then
# Snakemake's own validation against the same schema (which also fills the defaults).
include: "rules/common.smk"


validate(config, "workflow/mergelaws/schemas/config.schema.yaml")


include: "rules/base.smk"
include: "rules/train.smk"
include: "rules/sweep.smk"
include: "rules/fit.smk"
include: "rules/theory.smk"
include: "rules/downstream.smk"


rule all:
    input:
        # experts are products too: listing them here means a deleted expert is retrained
        # (and everything downstream of it redone), not silently skipped as an intermediate
        EXPERTS,
        LOSSES,
        FITS,
        MULTITASK,
        COMPUTE,
        PLAN,
        FIGURES,
        THEORY,
        DOWNSTREAM,
    default_target: True
