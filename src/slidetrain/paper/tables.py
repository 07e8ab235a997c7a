"""The papers' tables from run outputs, with the papers' reported values beside ours.

Run metrics live at results/{dataset}/runs/{method}/{split}/{seed}/metrics.json;
the method and dataset are read from that path. The papers' numbers are kept
as data (paper/data/*.csv, transcribed from the papers) and joined by the
names in PAPER_METHOD_NAMES and the config's `paper_name` per dataset.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.io import atomic_path

#: pipeline method key -> the name the local-learning paper's Table 1 uses
PAPER_METHOD_NAMES = {
    "maxpool": "Max-pooling",
    "meanpool": "Avg-pooling",
    "abmil": "ABMIL",
    "gabmil": "GABMIL",
    "milrnn": "MIL-RNN",
    "dsmil": "DSMIL",
    "clam_sb": "CLAM-SB",
    "clam_mb": "CLAM-MB",
    "streamingcnn": "StreamingCNN",
    "local_k4": "Local K=4",
    "local_k8": "Local K=8",
}
TABLE1_COLUMNS = [
    "method", "dataset", "accuracy", "auroc", "accuracy_std", "auroc_std", "n_seeds", "paper_accuracy", "paper_auroc",
]


def paper_table(name: str) -> pd.DataFrame:
    with resources.files("slidetrain.paper").joinpath("data", f"{name}.csv").open() as f:
        return pd.read_csv(f)


def run_key(metrics_path: str | Path) -> dict:
    """dataset, method, split, seed from results/{dataset}/runs/{method}/{split}/{seed}/metrics.json."""
    parts = Path(metrics_path).parts
    i = len(parts) - 1 - parts[::-1].index("runs")
    return {"dataset": parts[i - 1], "method": parts[i + 1], "split": parts[i + 2], "seed": parts[i + 3]}


def collect_runs(metrics_paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metrics_paths:
        result = json.loads(Path(path).read_text())
        rows.append({**run_key(path), **result["metrics"], "n_slides": result["n_slides"]})
    return pd.DataFrame(rows)


def table1(
    metrics_paths: list[str | Path],
    out_csv: str | Path,
    out_md: str | Path,
    paper_names: dict[str, str] | None = None,
    not_applicable: list[tuple[str, str]] = (),
    method_order: list[str] | None = None,
) -> pd.DataFrame:
    """One row per method and dataset: mean and std over runs (splits x seeds), paper values beside.

    `not_applicable` (method, dataset) pairs get a row of "/" (the paper's mark
    for MIL-RNN on multi-class tasks).
    """
    runs = collect_runs(metrics_paths)
    paper = paper_table("local_table1")
    paper_names = paper_names or {}
    rows = []
    for (dataset, method), group in runs.groupby(["dataset", "method"], sort=False):
        ref = paper[(paper.method == PAPER_METHOD_NAMES.get(method)) & (paper.dataset == paper_names.get(dataset))]
        rows.append(
            {
                "method": method,
                "dataset": dataset,
                "accuracy": group.accuracy.mean(),
                "auroc": group.auroc.mean(),
                "accuracy_std": group.accuracy.std(ddof=1) if len(group) > 1 else np.nan,
                "auroc_std": group.auroc.std(ddof=1) if len(group) > 1 else np.nan,
                "n_seeds": len(group),
                "paper_accuracy": ref.accuracy.iloc[0] if len(ref) else np.nan,
                "paper_auroc": ref.auroc.iloc[0] if len(ref) else np.nan,
            }
        )
    for method, dataset in not_applicable:
        rows.append({"method": method, "dataset": dataset, **{c: "/" for c in TABLE1_COLUMNS[2:]}})
    table = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    if method_order:
        order = {m: i for i, m in enumerate(method_order)}
        table = table.sort_values(["dataset", "method"], key=lambda s: s.map(order) if s.name == "method" else s)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_md) as tmp:
        tmp.write_text(to_markdown(table))
    return table


def to_markdown(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
