"""Big-Layers Tables 1 (QWK) and 2 (accuracy): tile-bag runs of three aggregators with the tile
encoder frozen or trained (the `offload` executor), with and without the per-slide augmentation,
each scored on the internal test part and on an external cohort, on all tiles and on R x K
sampled tiles; the paper's values beside where the test set stands for one of the paper's.

    slidetrain offload-table --metric qwk --paper-table offload_table1 --metrics results/.../metrics.json ...
        --test-datasets internal=synthetic external=synthetic_external --sampled-label 10x8
        --paper internal_all=panda external_all=tcga_prad_all external_sampled=tcga_prad_256 --out ...

A run's metrics live at
results/{dataset}/runs/biglayers_{aggregator}_{encoder}_{aug|noaug}/{split}/{seed}/test_{internal|external}_{all|sampled}/metrics.json
(workflow/rules/offload_tables.smk); everything a row needs is read from that path. The metric is
Big-Layers' test protocol: computed per repeat of sampled tiles, then averaged (one "repeat" for
all tiles), in % as the paper reports it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from slidetrain.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported when a table is built, not when the command line is parsed
    import pandas as pd

AGGREGATOR_NAMES = {"abmil": "ABMIL", "dtfd": "DTFD", "transmil": "TransMIL"}
METRICS = {"qwk": "qwk", "acc": "accuracy"}  # table column stem -> metrics.json key
PAPER_NAMES = {
    "panda": "PANDA",
    "tcga_prad_all": "TCGA-PRAD (all tiles)",
    "tcga_prad_256": "TCGA-PRAD (100 x 256)",
    "camelyon17": "CAMELYON17",
    "camelyon16": "CAMELYON16",
}

_PATH = re.compile(
    r"(?:^|/)results/(?P<dataset>[^/]+)/runs/biglayers_(?P<aggregator>[a-z0-9]+)_(?P<encoder>frozen|trained)_"
    r"(?P<aug>aug|noaug)/(?P<split>[^/]+)/(?P<seed>\d+)/test_(?P<testset>internal|external)_(?P<tiles>all|sampled)"
    r"/metrics\.json$"
)


def columns(metric: str) -> list[str]:
    return [
        "aggregator",
        "augmentation",
        "encoder",
        "dataset",
        "test_tiles",
        f"{metric}_mean",
        f"{metric}_std",
        "n_runs",
        f"paper_{metric}_mean",
        f"paper_{metric}_std",
        "paper_dataset",
    ]


def run_of(path: str | Path) -> dict:
    """The row keys of one metrics.json from its path; ConfigError naming a path of another layout."""
    m = _PATH.search(Path(path).as_posix())
    if m is None:
        raise ConfigError(
            f"offload-table: {path} is not results/{{dataset}}/runs/biglayers_{{aggregator}}_{{frozen|"
            f"trained}}_{{aug|noaug}}/{{split}}/{{seed}}/test_{{internal|external}}_{{all|sampled}}"
            f"/metrics.json"
        )
    return m.groupdict()


def offload_table(
    metrics_paths: list[str | Path],
    metric: str,
    paper_name: str,
    test_datasets: dict[str, str],
    sampled_label: str,
    paper_columns: dict[str, str],
    out_csv: str | Path,
    markdown: str | Path | None = None,
) -> pd.DataFrame:
    """Mean and std (in %) over runs per (aggregator, augmentation, encoder, test set, tiles).

    `test_datasets`: internal / external -> the dataset name shown; `sampled_label`: how sampled
    test tiles are shown (e.g. "10x8"); `paper_columns`: "{internal|external}_{all|sampled}" -> the
    prefix of the paper table's columns that test stands for (e.g. external_all=tcga_prad_all).
    """
    import numpy as np
    import pandas as pd

    from slidetrain.paper.reference import paper_row, paper_table, require_value
    from slidetrain.paper.tables import write_table

    if metric not in METRICS:
        raise ConfigError(f"offload-table: metric {metric!r}; expected one of {sorted(METRICS)}")
    paper = paper_table(paper_name)
    for test, prefix in paper_columns.items():  # every configured paper column must exist, used or not
        if f"{prefix}_{metric}_mean" not in paper.columns:
            raise ConfigError(
                f"offload-table: --paper {test}={prefix}: the paper's {paper_name} has no column "
                f"{prefix}_{metric}_mean; expected one of {sorted(_prefixes(paper, metric))}"
            )
    rows = []
    for path in metrics_paths:
        key = run_of(path)
        if key["aggregator"] not in AGGREGATOR_NAMES:
            raise ConfigError(
                f"offload-table: {path}: aggregator {key['aggregator']!r}; expected one of {sorted(AGGREGATOR_NAMES)}"
            )
        result = json.loads(Path(path).read_text())
        value = result.get("repeats", {}).get("metrics_mean", result["metrics"]).get(METRICS[metric])
        if value is None:
            raise ConfigError(
                f"offload-table: {path} has no {METRICS[metric]!r} (an ordinal test set is needed for qwk)"
            )
        rows.append({**key, "value": 100 * float(value)})
    runs = pd.DataFrame(rows)
    out = []
    order = {"internal": 0, "external": 1}
    for (agg, aug, enc, testset, tiles), g in runs.groupby(["aggregator", "aug", "encoder", "testset", "tiles"]):
        aggregator, augmentation = AGGREGATOR_NAMES[agg], "yes" if aug == "aug" else "no"
        prefix = paper_columns.get(f"{testset}_{tiles}")
        ref = {}
        # The paper's Table 2 has augmented runs only: a setting it never reports stays blank; any other
        # miss (an aggregator or encoder name the paper's table lacks) is an error.
        if prefix and augmentation in set(paper.augmentation):
            what = f"offload-table: {agg} {enc} {aug} on {testset}_{tiles}"
            require_value(paper, paper_name, "aggregator", aggregator, what)
            require_value(paper, paper_name, "encoder", enc, what)
            ref = paper_row(paper, paper_name, what, aggregator=aggregator, augmentation=augmentation, encoder=enc)
        out.append(
            {
                "aggregator": aggregator,
                "augmentation": augmentation,
                "encoder": enc,
                "dataset": test_datasets.get(testset, testset),
                "test_tiles": "all" if tiles == "all" else sampled_label,
                f"{metric}_mean": round(float(g.value.mean()), 2),
                f"{metric}_std": round(float(g.value.std(ddof=1)), 2) if len(g) > 1 else float("nan"),
                "n_runs": len(g),
                f"paper_{metric}_mean": float(ref[f"{prefix}_{metric}_mean"]) if len(ref) else np.nan,
                f"paper_{metric}_std": float(ref[f"{prefix}_{metric}_std"]) if len(ref) else np.nan,
                "paper_dataset": PAPER_NAMES.get(prefix, prefix) if len(ref) else "",
                "_order": (
                    order[testset],
                    tiles != "all",
                    augmentation,
                    list(AGGREGATOR_NAMES.values()).index(aggregator),
                    enc,
                ),
            }
        )
    table = pd.DataFrame(out)
    table = table.sort_values("_order").drop(columns="_order")[columns(metric)].reset_index(drop=True)
    write_table(table, out_csv, markdown)
    return table


def _prefixes(paper: pd.DataFrame, metric: str) -> set[str]:
    return {c.removesuffix(f"_{metric}_mean") for c in paper.columns if c.endswith(f"_{metric}_mean")}


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"offload-table: {what} {item!r}; expected KEY=VALUE")
        pairs[k] = v
    return pairs
