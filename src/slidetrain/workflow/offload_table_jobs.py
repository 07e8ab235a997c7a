"""The jobs of Big-Layers Tables 1 and 2 (workflow/rules/offload_tables.smk): config checks, each
run's TileBagConfig, its test sets and evaluation modes, the run lists and the table's arguments.

The `offload_tables` block names tables; each has a training `dataset`, an `external` test cohort,
its evaluation sampling (eval_k x eval_repeats) and the paper's values.
"""

from __future__ import annotations

import json
from typing import Any

from slidetrain.errors import ConfigError, SlidetrainError
from slidetrain.workflow.plan import Plan
from slidetrain.workflow.runs import expand

ENCODER_MODES = ("frozen", "trained")


def offload_tables_cfg(plan: Plan) -> dict[str, Any]:
    return plan.config.get("offload_tables", {})


def offload_tables(plan: Plan) -> dict[str, dict]:
    """Table name -> its block."""
    return offload_tables_cfg(plan).get("tables", {})


def table_of_dataset(plan: Plan, dataset: str) -> dict:
    """The block of the table whose training dataset is `dataset`."""
    by_dataset = {block["dataset"]: name for name, block in offload_tables(plan).items()}
    if dataset not in by_dataset:
        raise ConfigError(f"offload_tables: dataset {dataset!r} is no table's `dataset`; known: {sorted(by_dataset)}")
    return offload_tables(plan)[by_dataset[dataset]]


def check_offload_tables(plan: Plan) -> None:
    """Every table's datasets exist, its external cohort has the training dataset's classes, and every
    run's TileBagConfig is valid before any job starts (an unknown key names itself here)."""
    from slidetrain.configs.tilebag import tilebag_config  # torch-free: planning stays fast

    cfg = offload_tables_cfg(plan)
    for name, block in offload_tables(plan).items():
        for key in ("dataset", "external"):
            ds = block.get(key)
            if ds is not None and ds not in plan.sheets and ds not in plan.derived:
                raise ConfigError(f"offload_tables.tables.{name}.{key}: {ds!r} is not a dataset or derived dataset")
        ext = block.get("external")
        if ext and plan.dataset_cfg(ext)["classes"] != plan.dataset_cfg(block["dataset"])["classes"]:
            raise ConfigError(
                f"offload_tables.tables.{name}.external: {ext!r} has classes {plan.dataset_cfg(ext)['classes']},"
                f" expected those of {block['dataset']!r}: {plan.dataset_cfg(block['dataset'])['classes']}"
            )
    for enc in cfg.get("encoders", {}):
        if enc not in ENCODER_MODES:
            raise ConfigError(f"offload_tables.encoders: {enc!r}; expected frozen and/or trained")
    for name, block in offload_tables(plan).items():
        for agg in cfg.get("aggregators", []):
            arms = {}
            for enc in cfg.get("encoders", {}):
                try:
                    arms[enc] = tilebag_config(json.loads(biglayers_params(plan, block["dataset"], enc, agg, "aug")))
                except SlidetrainError as err:
                    raise ConfigError(f"offload_tables ({name}, {enc}, {agg}): {err}") from err
            check_arms_alike(arms, f"offload_tables ({name}, {agg})")


#: what the frozen and trained arms must share: the tables compare arms that differ only in whether
#: the encoder's weights move (same start, same input, same evaluation)
ARMS_ALIKE_KEYS = (
    "backbone",
    "weights",
    "weights_sha256",
    "input_px",
    "eval_tiles",
    "eval_k",
    "eval_repeats",
    "eval_chunk",
    "eval_bn",
)


def check_arms_alike(arms: dict[str, Any], where: str) -> None:
    """ConfigError naming the first key on which the arms' resolved TileBagConfigs differ."""
    if len(arms) < 2:
        return
    (first, a), *rest = arms.items()
    for other, b in rest:
        for key in ARMS_ALIKE_KEYS:
            if getattr(a, key) != getattr(b, key):
                raise ConfigError(
                    f"{where}: the {first} and {other} arms differ in {key} ({getattr(a, key)!r} vs "
                    f"{getattr(b, key)!r}); they must start from the same weights and be evaluated alike"
                )


def biglayers_params(plan: Plan, dataset: str, encoder: str, agg: str, aug: str) -> str:
    """The run's TileBagConfig as JSON: common keys, the table's, the encoder mode's, the aggregator and
    augmentation (`aug` or `noaug`)."""
    cfg = offload_tables_cfg(plan)
    table = table_of_dataset(plan, dataset)
    return json.dumps(
        {
            **cfg.get("params", {}),
            **table.get("params", {}),
            **cfg["encoders"][encoder],
            **table.get("encoder_params", {}).get(encoder, {}),
            "aggregator": agg,
            "aggregator_params": cfg.get("aggregator_params", {}).get(agg, {}),
            "augment": aug == "aug",
        }
    )


def _test_sets(plan: Plan, dataset: str, split: str) -> list[tuple[str, str, str]]:
    """(name, dataset, split file) of the model's test sets: its dataset's test part, the external cohort."""
    table = table_of_dataset(plan, dataset)
    return [
        ("internal", dataset, f"results/{dataset}/splits/{split}.csv"),
        ("external", table["external"], f"results/{table['external']}/splits/external.csv"),
    ]


def biglayers_test_splits(plan: Plan, dataset: str, split: str) -> list[str]:
    return [split_file for _, _, split_file in _test_sets(plan, dataset, split)]


def biglayers_tests(plan: Plan, dataset: str, split: str) -> str:
    """JSON list of the test sets for `slidetrain evaluate-tilebag-sets`."""
    tests = []
    for name, test_dataset, split_file in _test_sets(plan, dataset, split):
        base = plan.base_dataset(test_dataset)
        tests.append(
            {
                "name": name,
                "split": split_file,
                "sheet": plan.dataset_cfg(base)["sheet"],
                "slides_dir": f"resources/{base}/slides",
                "tiles_dir": f"results/{base}/tiles",
                "classes": plan.dataset_cfg(test_dataset)["classes"],
                "ordinal": bool(plan.dataset_cfg(test_dataset).get("ordinal")),
            }
        )
    return json.dumps(tests)


def biglayers_modes(plan: Plan, dataset: str) -> str:
    """All tiles, and the table's R x K sampled tiles (JSON)."""
    table = table_of_dataset(plan, dataset)
    return json.dumps(
        {
            "all": {"eval_tiles": "all"},
            "sampled": {"eval_tiles": "sampled", "eval_k": table["eval_k"], "eval_repeats": table["eval_repeats"]},
        }
    )


def offload_table_splits(plan: Plan, dataset: str) -> list[str]:
    """The first `offload_tables.splits` of the dataset's splits (its official split only when mccv: false)."""
    return plan.splits_of(dataset)[: offload_tables_cfg(plan).get("splits", 1)]


def offload_table_metrics(plan: Plan, name: str) -> list[str]:
    """Every metrics.json table `name` reads: aggregator x encoder mode x augmentation x split x seed,
    each tested on both test sets with all and sampled tiles."""
    cfg = offload_tables_cfg(plan)
    block = offload_tables(plan)[name]
    return expand(
        "results/{dataset}/runs/biglayers_{agg}_{encoder}_{aug}/{split}/{seed}/test_{testset}_{tiles}/metrics.json",
        dataset=block["dataset"],
        agg=cfg.get("aggregators", []),
        encoder=list(cfg.get("encoders", {})),
        aug=cfg.get("augmentation", ["aug"]),
        split=offload_table_splits(plan, block["dataset"]),
        seed=plan.seeds,
        testset=["internal", "external"],
        tiles=["all", "sampled"],
    )


def offload_table_args(plan: Plan, name: str) -> str:
    """`slidetrain offload-table` arguments: metric, paper table, test datasets, sampling label, paper values."""
    block = offload_tables(plan)[name]
    shown = [f"internal={block['dataset']}", f"external={block['external']}"]
    paper = " ".join(f"{k}={v}" for k, v in block.get("paper", {}).items())
    return (
        f"--metric {block['metric']} --paper-table {name} --test-datasets {' '.join(shown)}"
        f" --sampled-label {block['eval_repeats']}x{block['eval_k']}" + (f" --paper {paper}" if paper else "")
    )
