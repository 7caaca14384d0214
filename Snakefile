# dgex: D-GEX (Chen et al. 2016) as a Snakemake experiment grid.
#   snakemake --cores 2                                  # embedded demo (config/config.yaml)
#   snakemake --cores 8 --configfile config/paper.yaml   # the paper's data and grid
# Rules live in workflow/rules/<stage>.smk; input functions in common.smk.
from snakemake.utils import min_version, validate

min_version("9.0")


# The demo config applies only when no --configfile is given: a user's config
# is never merged over it (it gets the schema's defaults below, nothing else).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


# `--resources gpu=N` caps concurrent GPU jobs per machine (local scope);
# each training job leases its own device itself (Snakemake does not).
resource_scopes:
    gpu="local",


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/acquire.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/test_sets.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/interpret.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
        test_set_outputs(),
