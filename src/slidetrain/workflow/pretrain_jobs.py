"""The pretraining jobs (workflow/rules/pretrain.smk): the cohort they read and the probe's dataset."""

from __future__ import annotations

from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan


def pretrain_cohort(plan: Plan) -> str:
    """`pretrain.cohort`, which must be a dataset marked pretrain_only (never split, trained or tested on)."""
    if "pretrain" not in plan.config:
        raise ConfigError(
            "a weights file under results/pretrain/ needs the config's `pretrain` block (docs/pretraining.md)"
        )
    cohort = plan.config["pretrain"]["cohort"]
    if cohort not in plan.sheets:
        raise ConfigError(
            f"pretrain.cohort: {cohort!r} is not a dataset; known: {sorted(plan.sheets)}. A `weights:` key names"
            " an encoder pretrained on it (results/pretrain/): keep that dataset's block, name a pretrain_only"
            " dataset of yours, or set the weights keys to imagenet or a weights file (docs/pretraining.md)"
        )
    if not plan.dataset_cfg(cohort).get("pretrain_only", False):
        raise ConfigError(f"pretrain.cohort: dataset {cohort!r} must be marked pretrain_only: true")
    return cohort


def cohort_args(plan: Plan, dataset: str) -> str:
    """--sheet/--slides-dir/--tiles-dir/--tile-px/--target-magnification of one dataset's tiles."""
    pre = plan.config["preprocess"]
    return (
        f"--sheet {plan.dataset_cfg(dataset)['sheet']} --slides-dir resources/{dataset}/slides"
        f" --tiles-dir results/{dataset}/tiles --tile-px {pre['tile_px']}"
        f" --target-magnification {pre['target_magnification']}"
    )


def probe_args(plan: Plan) -> str:
    """The probe dataset's tile arguments, classes and ordinal flag."""
    dataset = plan.config["pretrain"]["probe"]["dataset"]
    block = plan.dataset_cfg(dataset)
    ordinal = " --ordinal" if block.get("ordinal") else ""
    return f"{cohort_args(plan, dataset)} --classes {' '.join(block['classes'])}{ordinal}"


def probe_split(plan: Plan) -> str:
    probe = plan.config["pretrain"]["probe"]
    return f"results/{probe['dataset']}/splits/{probe['split']}.csv"
