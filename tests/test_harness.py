"""The shared epoch loop: selection window, early stopping, exact resume from the checkpoint."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from slidetrain.train.harness import Selection, run_epochs, write_run_files


class _Killed(Exception):
    pass


def toy_run(out, val_scores, selection, stop_after=None, epochs=None):
    """A linear model trained on random data; validate returns the scripted `val_scores`."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_epoch(epoch):
        x = torch.randn(8, 3)  # global generator: restored on resume
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return {"train_loss": float(loss.detach())}

    def validate(epoch):
        return {"val_auroc": val_scores[epoch]}

    def stop(done):
        if done == stop_after:
            raise _Killed

    result = run_epochs(out, "tag", epochs or len(val_scores), train_epoch, validate,
                        {"model": model, "optimizers": [opt]}, model.state_dict, selection, stop_hook=stop)
    return result, model


def test_selection_window_and_early_stopping(tmp_path):
    scores = [0.9, 0.5, 0.6, 0.7, 0.6, 0.6, 0.6, 0.95]
    result, _ = toy_run(tmp_path / "a", scores, Selection("val_auroc", start_epoch=2))
    assert [r["selected"] for r in result.history] == [False, False, True, True, False, False, False, True]
    assert result.best == 0.95
    result, _ = toy_run(tmp_path / "b", scores, Selection("val_auroc", patience=2, min_epochs=5))
    assert len(result.history) == 5  # stale 2 after epoch 3 but not before 5 epochs; stale 4 at 5
    result, _ = toy_run(tmp_path / "c", scores, Selection("val_auroc", patience=3))
    assert len(result.history) == 4


def test_a_killed_run_resumes_exactly_and_writes_run_files(tmp_path):
    scores = [0.5, 0.6, 0.55, 0.7, 0.65]
    whole, whole_model = toy_run(tmp_path / "whole", scores, Selection("val_auroc"))
    with pytest.raises(_Killed):
        toy_run(tmp_path / "killed", scores, Selection("val_auroc"), stop_after=2)
    assert len(pd.read_csv(tmp_path / "killed" / "history.csv")) == 2
    torch.manual_seed(123)  # a fresh process's RNG: the checkpoint restores the run's
    resumed, resumed_model = toy_run(tmp_path / "killed", scores, Selection("val_auroc"))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert all(torch.equal(whole.best_state[k], resumed.best_state[k]) for k in whole.best_state)
    assert torch.equal(whole_model.weight, resumed_model.weight)
    model_pt = write_run_files(tmp_path / "killed", "toy", {"lr": 0.1}, 0, resumed, {"note": 1},
                               lambda best: {"state": best})
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert run["epochs_run"] == 5 and run["note"] == 1 and run["selection"]["best"] == 0.7
    assert torch.equal(torch.load(model_pt)["state"]["weight"], whole.best_state["weight"])
