"""The papers' tables from run outputs, with the papers' reported values beside ours.

Run metrics live at results/{dataset}/runs/{method}/{split}/{seed}/metrics.json;
the method and dataset are read from that path. The papers' numbers are kept
as data (paper/data/*.csv, transcribed from the papers) and joined by the
names in PAPER_METHOD_NAMES and the config's `paper_name` per dataset. The join is strict: a
configured paper name that the paper's table lacks, or a paper method with no row for it, stops the
table with an error naming it; only a method the paper never reports gets a blank paper column.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.io import atomic_path
from slidetrain.paper.reference import paper_row, paper_table, require_value
from slidetrain.report_html import write_table_html

__all__ = ["paper_table", "table1", "table4", "write_table"]  # paper_table: re-exported for older callers

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
    "method",
    "dataset",
    "accuracy",
    "auroc",
    "accuracy_std",
    "auroc_std",
    "n_seeds",
    "paper_accuracy",
    "paper_auroc",
]


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
    out_html: str | Path | None = None,
) -> pd.DataFrame:
    """One row per method and dataset: mean and std over runs (splits x seeds), paper values beside.

    `not_applicable` (method, dataset) pairs get a row of "/" (the paper's mark
    for MIL-RNN on multi-class tasks).
    """
    runs = collect_runs(metrics_paths)
    paper = paper_table("local_table1")
    paper_names = paper_names or {}
    check_paper_names(paper, "local_table1", paper_names)
    rows = []
    for (dataset, method), group in runs.groupby(["dataset", "method"], sort=False):
        ref = {}
        if method in PAPER_METHOD_NAMES and dataset in paper_names:  # otherwise the paper reports no such value
            ref = paper_row(
                paper,
                "local_table1",
                f"table1: method {method!r} on dataset {dataset!r}",
                method=PAPER_METHOD_NAMES[method],
                dataset=paper_names[dataset],
            )
        rows.append(
            {
                "method": method,
                "dataset": dataset,
                "accuracy": group.accuracy.mean(),
                "auroc": group.auroc.mean(),
                "accuracy_std": group.accuracy.std(ddof=1) if len(group) > 1 else np.nan,
                "auroc_std": group.auroc.std(ddof=1) if len(group) > 1 else np.nan,
                "n_seeds": len(group),
                "paper_accuracy": ref.get("accuracy", np.nan),
                "paper_auroc": ref.get("auroc", np.nan),
            }
        )
    for method, dataset in not_applicable:
        rows.append({"method": method, "dataset": dataset, **{c: "/" for c in TABLE1_COLUMNS[2:]}})
    table = pd.DataFrame(rows, columns=TABLE1_COLUMNS)
    if method_order:
        order = {m: i for i, m in enumerate(method_order)}
        table = table.sort_values(["dataset", "method"], key=lambda s: s.map(order) if s.name == "method" else s)
    write_table(
        table,
        out_csv,
        out_md,
        out_html,
        "Table 1: test accuracy and AUROC per method (paper values beside)",
        float_format="%.4f",
    )
    return table


#: whole-image method -> the RFR ablation's setting name (the local-learning paper's Table 4)
TABLE4_SETTINGS = {
    "local_k4_norfr": "K=4 without RFR",
    "local_k4": "K=4 with RFR",
    "local_k8_norfr": "K=8 without RFR",
    "local_k8": "K=8 with RFR",
}
TABLE4_COLUMNS = ["setting", "dataset", "accuracy", "paper_accuracy", "accuracy_std", "n_runs"]


def table4(
    metrics_paths: list[str | Path],
    out_csv: str | Path,
    out_md: str | Path,
    paper_names: dict[str, str] | None = None,
    out_html: str | Path | None = None,
) -> pd.DataFrame:
    """The RFR ablation: test accuracy (mean over runs) of K=4/8 with and without RFR, paper values beside."""
    runs = collect_runs(metrics_paths)
    unknown = sorted(set(runs.method) - set(TABLE4_SETTINGS))
    if unknown:
        raise ValueError(f"table4: methods {unknown} are not settings of the RFR ablation {sorted(TABLE4_SETTINGS)}")
    paper = paper_table("local_table4")
    paper_names = paper_names or {}
    check_paper_names(paper, "local_table4", paper_names)
    rows = []
    for method, setting in TABLE4_SETTINGS.items():
        for dataset, group in runs[runs.method == method].groupby("dataset", sort=True):
            ref = {}
            if dataset in paper_names:
                ref = paper_row(
                    paper,
                    "local_table4",
                    f"table4: method {method!r} on dataset {dataset!r}",
                    setting=setting,
                    dataset=paper_names[dataset],
                )
            rows.append(
                {
                    "setting": setting,
                    "dataset": dataset,
                    "accuracy": group.accuracy.mean(),
                    "paper_accuracy": ref.get("accuracy", np.nan),
                    "accuracy_std": group.accuracy.std(ddof=1) if len(group) > 1 else np.nan,
                    "n_runs": len(group),
                }
            )
    table = pd.DataFrame(rows, columns=TABLE4_COLUMNS)
    write_table(
        table,
        out_csv,
        out_md,
        out_html,
        "Table 4: the RFR ablation, test accuracy (paper values beside)",
        float_format="%.4f",
    )
    return table


def check_paper_names(paper: pd.DataFrame, table_name: str, paper_names: dict[str, str]) -> None:
    """Every configured `paper_name` must be a dataset of the paper's table (a typo stops the table)."""
    for dataset, name in paper_names.items():
        require_value(paper, table_name, "dataset", name, f"datasets.{dataset}.paper_name")


def write_table(
    table: pd.DataFrame,
    out_csv: str | Path,
    out_md: str | Path | None = None,
    out_html: str | Path | None = None,
    title: str = "",
    float_format: str | None = None,
) -> None:
    """A paper table as CSV, and as Markdown and report HTML when asked; each file written atomically."""
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format=float_format)
    if out_md:
        with atomic_path(out_md) as tmp:
            tmp.write_text(to_markdown(table))
    if out_html:
        write_table_html(table, out_html, title)


def to_markdown(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
