# slidetrain: from raw slides to the papers' tables.
#   snakemake --cores all results/tables/table1.csv      (default config: synthetic dataset, CPU)
#   snakemake -n --workflow-profile profiles/slurm ...   (SLURM cluster)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


# A user's --configfile replaces the default's datasets and method blocks instead of merging into them.
from slidetrain.workflow_config import replace_named_blocks

replace_named_blocks(config, workflow.config_settings.overwrite_config)


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/slides.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/offload.smk"
include: "workflow/rules/distributed.smk"
include: "workflow/rules/tilebag.smk"
include: "workflow/rules/offload_tables.smk"
include: "workflow/rules/docs.smk"
include: "workflow/rules/heatmaps.smk"


rule all:
    input:
        "results/tables/table1.csv",
        "results/qc/excluded.csv",
        # what needs the slides preprocessed: not for datasets of features other tools wrote (features_dir)
        ["results/bench/preprocess.csv"] if PREPROCESSED_MAIN else [],
        expand(
            "results/figures/attention_{dataset}.png",
            dataset=[d for d in config["table1"]["datasets"] if PLAN.extracts_features(base_dataset(d))],
        ),
    default_target: True
