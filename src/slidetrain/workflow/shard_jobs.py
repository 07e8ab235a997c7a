"""Inputs and arguments of the per-shard jobs (synthesize, preprocess, features).

Per-slide work runs one job per fixed group of a dataset's slides (membership: slidetrain.data.shards);
per-slide outputs keep their paths, and the shard's manifest is what Snakemake tracks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from shlex import quote

from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan
from slidetrain.workflow.slide_files import slide_file, synthetic_slides


def manifests(plan: Plan, dataset: str, step: str) -> list[str]:
    """Every shard manifest of one step (preprocess, synthesize, features/{encoder}) of a dataset."""
    return [f"results/{dataset}/shards/{step}/{shard}.tsv" for shard in plan.shards[dataset]]


def features_step(plan: Plan, encoder: str | None = None) -> str:
    """The manifest step of an encoder's features (the configured encoder by default)."""
    return f"features/{encoder or plan.config['features']['encoder']}"


def shard_members(plan: Plan, dataset: str, shard: str) -> list[str]:
    try:
        return plan.shards[dataset][shard]
    except KeyError:
        raise ConfigError(
            f"dataset {dataset!r} has no shard {shard!r} at shards.slides_per_shard = {plan.slides_per_shard};"
            f" its shards: {sorted(plan.shards.get(dataset, {}))}"
        ) from None


def shard_slide_inputs(plan: Plan, dataset: str, shard: str) -> list[str]:
    """The shard's slides: its synthesis manifest for drawn slides, the files themselves otherwise."""
    members = shard_members(plan, dataset, shard)
    synthetic = set(synthetic_slides(plan, dataset, members))
    files = [slide_file(plan, dataset, s) for s in members if s not in synthetic]
    if synthetic:
        files.append(f"results/{dataset}/shards/synthesize/{shard}.tsv")
    return files


def shard_slides_arg(plan: Plan, dataset: str, shard: str) -> str:
    """id=path ... of the shard's members for --slides (quoted for the shell)."""
    return " ".join(quote(f"{s}={slide_file(plan, dataset, s)}") for s in shard_members(plan, dataset, shard))


def synthesize_shard_args(plan: Plan, dataset: str, shard: str) -> str:
    """`slidetrain synthesize-shard` arguments: the shard's drawn slides with their labels, the dataset's
    seed, size range and (if set) stain scale and difficulty. A classic difficulty without overrides
    adds no argument, so the rule's parameters (a rerun trigger) stay as they were before difficulties."""
    ds: Mapping = plan.dataset_cfg(dataset)
    labels = plan.sheets[dataset].label
    members = synthetic_slides(plan, dataset, shard_members(plan, dataset, shard))
    slides = " ".join(quote(f"{s}={labels.at[s]}") for s in members)
    size = " ".join(map(str, ds["synthetic_size_range_px"]))
    args = f"--slides {slides} --seed {ds['synthetic_seed']} --size-range-px {size}"
    if ds.get("synthetic_stain_scale"):
        args += " --stain-scale " + " ".join(map(str, ds["synthetic_stain_scale"]))
    difficulty = ds.get("synthetic_difficulty", "classic")
    overrides = ds.get("synthetic_difficulty_overrides") or {}
    if difficulty != "classic" or overrides:
        args += f" --difficulty {quote(difficulty)}"
    if overrides:
        args += f" --difficulty-overrides {quote(json.dumps(dict(overrides), sort_keys=True))}"
    return args


def bench_shard(plan: Plan) -> tuple[str, str]:
    """(dataset, shard) timed by the feature-throughput benchmark: the first shard of Table 1's first dataset."""
    dataset = plan.config["table1"]["datasets"][0]
    return dataset, next(iter(plan.shards[dataset]))
