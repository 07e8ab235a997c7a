"""The run lists that tables and targets collect: one file per (dataset, method, split, seed)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from slidetrain.configs import METHODS
from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan


def expand(pattern: str, **values: str | Iterable[str]) -> list[str]:
    """`pattern` formatted with every combination of `values` (a str is one value), the last key
    varying fastest, as Snakemake's expand."""
    lists = [[v] if isinstance(v, str) else list(v) for v in values.values()]
    return [pattern.format(**dict(zip(values, combo, strict=True))) for combo in itertools.product(*lists)]


def runs_of(plan: Plan, dataset: str, method: str) -> list[str]:
    """metrics.json of every run of `method` on `dataset`: its splits (whole-image methods only the first
    training.whole_image_splits, when set) times the seeds."""
    splits = plan.splits_of(dataset)
    whole_image_splits = plan.config.get("training", {}).get("whole_image_splits")
    if method in plan.image_methods and whole_image_splits:
        splits = splits[:whole_image_splits]
    return expand(
        "results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
        dataset=dataset,
        method=method,
        split=splits,
        seed=plan.seeds,
    )


def table1_applicable(plan: Plan, method: str, dataset: str) -> bool:
    """Binary-only methods (MIL-RNN) get a '/' row on multi-class datasets, as the paper shows."""
    return not (METHODS[method].binary_only and len(plan.dataset_cfg(dataset)["classes"]) != 2)


def table1_metrics(plan: Plan) -> list[str]:
    """Every run Table 1 reads: its methods on its datasets, less the '/' cells."""
    table = plan.config["table1"]
    return [
        f
        for dataset in table["datasets"]
        for method in table["methods"]
        if table1_applicable(plan, method, dataset)
        for f in runs_of(plan, dataset, method)
    ]


def table4_metrics(plan: Plan) -> list[str]:
    table = plan.config["table4"]
    return [f for d in table["datasets"] for m in table["methods"] for f in runs_of(plan, d, m)]


def attention_methods(plan: Plan, dataset: str) -> list[str]:
    """Table 1 methods that export per-tile attention and ran on `dataset`."""
    return [
        m
        for m in plan.config["table1"]["methods"]
        if m in plan.mil_methods and METHODS[m].has_attention and table1_applicable(plan, m, dataset)
    ]


def tilebag_splits(plan: Plan) -> list[str]:
    """The first tilebag.splits MCCV splits (all by default)."""
    return plan.splits[: plan.config.get("tilebag", {}).get("splits", len(plan.splits))]


def tilebag_runs(plan: Plan, kind: str, left_out: Iterable[str] = ()) -> list[str]:
    """metrics.json (kind "metrics") or history.csv of the tile-bag K sweep and strategies, but the runs
    `left_out` (tilebag_params.tilebag_emulated_amp); with "metrics", then the frozen-feature MIL runs
    beside them."""
    tilebag = plan.config.get("tilebag", {})
    name = "metrics.json" if kind == "metrics" else "history.csv"
    # the K sweep (single), then the other strategies at tilebag.strategy_k (tilebag_{strategy}_k{K})
    runs = [f"tilebag_k{k}" for k in tilebag.get("k_sweep", [])]
    runs += [f"tilebag_{s}_k{k}" for s in tilebag.get("strategies", {}) for k in tilebag.get("strategy_k", [])]
    skip = set(left_out)
    runs = [r for r in runs if r not in skip]
    splits, datasets = tilebag_splits(plan), tilebag.get("datasets", [])
    files = expand(
        "results/{dataset}/runs/{run}/{split}/{seed}/{name}",
        dataset=datasets,
        run=runs,
        split=splits,
        seed=plan.seeds,
        name=name,
    )
    if kind == "metrics":
        files += expand(
            "results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
            dataset=datasets,
            method=tilebag.get("frozen_methods", []),
            split=splits,
            seed=plan.seeds,
        )
    return files


def difficulty_probe_runs(plan: Plan) -> list[dict]:
    """The runs of the difficulty probe (config `difficulty_probe`): its methods on its datasets, on its
    splits, times the seeds, each with its run directory (where training writes history.csv) and the
    dataset's synthetic_difficulty. Called only when the probe's target is asked for, so a config whose
    datasets replace the default's fails here, naming the key, and nowhere else."""
    probe = plan.config.get("difficulty_probe") or {}
    datasets, methods = list(probe.get("datasets", [])), list(probe.get("methods", []))
    unknown = [d for d in datasets if d not in plan.config["datasets"]]
    if unknown:
        raise ConfigError(
            f"difficulty_probe.datasets names {unknown}, which the config does not define; its datasets:"
            f" {sorted(plan.config['datasets'])}"
        )
    not_mil = [m for m in methods if m not in plan.mil_methods]
    if not_mil:
        raise ConfigError(
            f"difficulty_probe.methods {not_mil}: expected frozen-feature methods {sorted(plan.mil_methods)}"
        )
    runs = []
    for dataset in datasets:
        splits = list(probe.get("splits", plan.splits_of(dataset)[:1]))
        missing = [s for s in splits if s not in plan.splits_of(dataset)]
        if missing:
            raise ConfigError(f"difficulty_probe.splits {missing}: dataset {dataset!r} has {plan.splits_of(dataset)}")
        difficulty = plan.config["datasets"][dataset].get("synthetic_difficulty", "classic")
        for method, split, seed in itertools.product(methods, splits, plan.seeds):
            run_dir = f"results/{dataset}/runs/{method}/{split}/{seed}"
            runs.append(
                dict(dataset=dataset, difficulty=difficulty, method=method, split=split, seed=seed, run_dir=run_dir)
            )
    return runs
