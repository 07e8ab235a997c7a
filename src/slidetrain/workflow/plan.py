"""What the workflow knows once its config is parsed: sheets, derived datasets, splits, seeds, shards.

A `Plan` is built once per Snakemake parse (`build_plan`); the other modules of this package take it
as their first argument, and workflow/rules/common.smk binds them to the one plan of the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from slidetrain.configs import image_methods
from slidetrain.data.shards import assign_shards
from slidetrain.workflow.sheets import RowValidator, check_derived, check_methods, check_pretrain_cohorts, load_sheets

#: shards.slides_per_shard when the config does not set it
DEFAULT_SLIDES_PER_SHARD = 32


@dataclass(frozen=True)
class Plan:
    config: Mapping[str, Any]
    #: dataset -> its sheet, indexed by slide_id (derived datasets have none: they use their source's)
    sheets: dict[str, pd.DataFrame]
    #: derived dataset -> its block (from, label_map, classes, ...)
    derived: dict[str, dict]
    #: dataset -> shard name -> its slide ids (slidetrain.data.shards: stable membership)
    shards: dict[str, dict[str, list[str]]]

    @property
    def splits(self) -> list[str]:
        """The Monte Carlo cross-validation splits every dataset has: mccv0, mccv1, ..."""
        return [f"mccv{i}" for i in range(self.config["splits"]["mccv_folds"])]

    @property
    def official(self) -> Mapping[str, Any]:
        """Datasets with an official train/test split (splits.official)."""
        return self.config["splits"].get("official", {})

    @property
    def seeds(self) -> list[str]:
        return [str(s) for s in self.config["seeds"]]

    @property
    def slides_per_shard(self) -> int:
        return self.config.get("shards", {}).get("slides_per_shard", DEFAULT_SLIDES_PER_SHARD)

    # Two trainers share the run layout: MIL aggregators on cached features, whole-image learners on
    # the 5x (or configured) slide images. Each rule accepts only its own methods (wildcard constraints).
    @cached_property
    def image_methods(self) -> list[str]:
        return sorted(m for m in self.config["methods"] if m in image_methods())

    @cached_property
    def mil_methods(self) -> list[str]:
        return sorted(m for m in self.config["methods"] if m not in self.image_methods)

    @property
    def all_methods(self) -> list[str]:
        return sorted(self.config["methods"])

    def dataset_cfg(self, dataset: str) -> Mapping[str, Any]:
        """A dataset's config block; a derived dataset's is its source's (sheet, mpp_fallback, ...) with
        its own labels."""
        if dataset in self.derived:
            block = self.derived[dataset]
            return {**self.config["datasets"][block["from"]], "paper_name": None, "ordinal": False, **block}
        return self.config["datasets"][dataset]

    def base_dataset(self, dataset: str) -> str:
        """The dataset whose slides, tiles and features `dataset` uses (itself unless derived)."""
        return self.derived[dataset]["from"] if dataset in self.derived else dataset

    def features_dir(self, dataset: str) -> str | None:
        """The folder of per-slide feature files another tool wrote for `dataset` (datasets.X.features_dir;
        a derived dataset: its source's), or None when the pipeline extracts its own."""
        folder = self.dataset_cfg(dataset).get("features_dir")
        return os.path.expanduser(folder) if folder else None

    def extracts_features(self, dataset: str) -> bool:
        """Whether the pipeline tiles, preprocesses and encodes `dataset`'s slides for its MIL runs (no
        features_dir)."""
        return self.features_dir(dataset) is None

    def slide_ids(self, dataset: str) -> list[str]:
        return self.sheets[dataset].slide_id.tolist()

    def dataset_split(self, dataset: str) -> Mapping[str, Any]:
        """A dataset's own split settings (datasets.X.split), over the global `splits`."""
        return self.dataset_cfg(dataset).get("split", {})

    def splits_of(self, dataset: str) -> list[str]:
        """The dataset's splits: the MCCV splits, then `official` when it has one; only `official`
        when its split block says mccv: false (CAMELYON)."""
        if self.dataset_split(dataset).get("mccv") is False:
            return ["official"]
        return self.splits + (["official"] if dataset in self.official else [])

    def main_datasets(self) -> list[str]:
        """Datasets of the main job's QC table and preprocessing benchmark: all but the test-only cohorts
        (`test_only: true`, e.g. Big-Layers' external cohort, built only by the targets that test on it),
        the pretraining cohort (`pretrain_only: true`, read only by results/pretrain/) and cohorts other
        targets train on (`main_job: false`, e.g. Big-Layers' synthetic_classic)."""
        side = ("test_only", "pretrain_only")

        def main(d: dict) -> bool:
            return d.get("main_job", True) and not any(d.get(k, False) for k in side)

        return [d for d in self.sheets if main(self.config["datasets"][d])]


def method_regex(methods: Iterable[str]) -> str:
    """A wildcard constraint matching exactly `methods`."""
    methods = list(methods)
    # A never-matching pattern when a config has no method of this kind (an empty alternation matches "").
    return "|".join(methods) if methods else "(?!x)x"


def build_plan(config: Mapping, schema_path: str | Path, validate_rows: RowValidator | None = None) -> Plan:
    """Read and check every sheet, the derived datasets and the method blocks; assign the shards."""
    sheets = load_sheets(config["datasets"], schema_path, validate_rows)
    derived = check_derived(config, sheets)
    check_pretrain_cohorts(config, sheets)
    check_methods(config)
    per_shard = config.get("shards", {}).get("slides_per_shard", DEFAULT_SLIDES_PER_SHARD)
    shards = {d: assign_shards(sheet.slide_id.tolist(), per_shard) for d, sheet in sheets.items()}
    return Plan(config=config, sheets=sheets, derived=derived, shards=shards)
