"""The difficulty probe reads validation metrics of the selected epoch from history.csv, never test metrics."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slidetrain.bench.difficulty import selected_validation
from slidetrain.cli import main
from slidetrain.errors import ConfigError


def _run(root, name: str, val_auroc: list[float], selected: list[bool], test_auroc: float) -> str:
    run_dir = root / name
    run_dir.mkdir()
    epochs = range(1, len(val_auroc) + 1)
    pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": [1.0 / e for e in epochs],
            "val_loss": [0.9 - 0.1 * e for e in epochs],
            "val_auroc": val_auroc,
            "seconds": 0.1,
            "selected": selected,
        }
    ).to_csv(run_dir / "history.csv", index=False)
    # what the test scoring writes beside it: the probe must not read it
    (run_dir / "metrics.json").write_text(json.dumps({"auroc": test_auroc, "test_auroc": test_auroc}))
    return str(run_dir)


def test_the_table_holds_the_selected_epochs_validation_auroc_not_the_test_one(tmp_path):
    runs = [
        {"dataset": "syn_hard", "difficulty": "hard", "method": "abmil", "split": "mccv0", "seed": "0",
         "run_dir": _run(tmp_path, "a", [0.7, 0.9, 0.8], [True, False, True], test_auroc=0.111)},
        {"dataset": "syn_hard", "difficulty": "hard", "method": "meanpool", "split": "mccv0", "seed": "0",
         "run_dir": _run(tmp_path, "m", [0.6, 0.65], [False, False], test_auroc=0.222)},
    ]  # fmt: skip
    out = tmp_path / "difficulty.csv"
    rc = main(
        ["bench-difficulty", "--runs", json.dumps(runs), "--overrides", json.dumps({"syn_hard": {"n_sites": 2}}),
         "--encoder", "resnet34", "--weights", "none", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    table = pd.read_csv(out)
    assert table.val_auroc.tolist() == [0.8, 0.65]  # abmil: the last selected epoch (3); meanpool: none, the last
    assert table.selected_epoch.tolist() == [3, 2] and table.val_auroc_best_epoch.tolist() == [0.9, 0.65]
    assert (table.weights == "none").all() and table.overrides[0] == '{"n_sites": 2}'


def test_a_history_without_validation_auroc_is_an_error_naming_it(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,val_loss,selected\n1,0.5,True\n")
    with pytest.raises(ConfigError, match=r"history.csv: .*missing \['val_auroc'\]"):
        selected_validation(tmp_path / "history.csv")
