"""How hard a synthetic difficulty preset is: validation AUROC of a few methods, from validation only.

Why: the default task's difficulty is a setting like any other, so it is chosen on validation parts,
never on test (the test part is touched once, by the runs a table reports). Each run's history.csv
holds the per-epoch validation metrics; this reads the row of the epoch that model selection kept
(the model a test would score) and never opens the run's metrics.json or predictions.csv.

    from slidetrain.bench.difficulty import difficulty_table
    difficulty_table([{"dataset": "synthetic_hard", "difficulty": "hard", "method": "abmil",
                       "split": "mccv0", "seed": 0, "run_dir": "results/synthetic_hard/runs/abmil/mccv0/0"}],
                     "results/bench/difficulty.csv", encoder="resnet34", weights="none")

The rule `difficulty_probe` (workflow/rules/bench.smk) trains the runs and calls this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from slidetrain.docs.benchmarks import cpu_model
from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path

#: what a run entry must name (run_dir holds history.csv)
RUN_KEYS = ("dataset", "difficulty", "method", "split", "seed", "run_dir")


def selected_validation(history_csv: str | Path) -> dict:
    """Validation metrics of the epoch model selection kept: the last row marked `selected` (the
    last row when none is, as the trainer then keeps the last model), plus the best validation
    AUROC of any epoch and the epoch count."""
    path = Path(history_csv)
    history = pd.read_csv(path)
    missing = sorted({"epoch", "val_auroc", "selected"} - set(history.columns))
    if history.empty or missing:
        raise ConfigError(
            f"{path}: expected per-epoch rows with epoch, val_auroc, selected; missing {missing or 'rows'}"
        )
    selected = history[history.selected.astype(str).str.lower() == "true"]
    row = (selected if len(selected) else history).iloc[-1]
    return {
        "val_auroc": float(row.val_auroc),
        "val_loss": float(row.val_loss) if "val_loss" in history else float("nan"),
        "selected_epoch": int(row.epoch),
        "epochs": int(history.epoch.max()),
        "val_auroc_best_epoch": float(history.val_auroc.max()),
    }


def difficulty_table(
    runs: Sequence[Mapping], out: str | Path, encoder: str, weights: str, overrides: Mapping | None = None
) -> pd.DataFrame:
    """One row per run (RUN_KEYS) with its selected epoch's validation metrics, written to `out`.

    `overrides`: dataset -> its synthetic_difficulty_overrides, recorded beside the preset name.
    """
    rows = []
    for run in runs:
        missing = [k for k in RUN_KEYS if k not in run]
        if missing:
            raise ConfigError(f"difficulty probe run {dict(run)}: missing {missing}")
        rows.append(
            {
                "dataset": run["dataset"],
                "difficulty": run["difficulty"],
                "overrides": json.dumps(dict((overrides or {}).get(run["dataset"]) or {}), sort_keys=True),
                "method": run["method"],
                "split": run["split"],
                "seed": int(run["seed"]),
                **selected_validation(Path(run["run_dir"]) / "history.csv"),
                "encoder": encoder,
                "weights": weights,
                "cpu": cpu_model(),
            }
        )
    table = pd.DataFrame(rows)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return table


def summary(table: pd.DataFrame) -> str:
    """The table as validation AUROC per difficulty (rows) and method (columns), mean over runs."""
    wide = table.pivot_table(index=["dataset", "difficulty"], columns="method", values="val_auroc", aggfunc="mean")
    return wide.round(3).to_string()
