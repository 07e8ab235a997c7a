"""The shared epoch loop: selection window, early stopping, exact resume from the checkpoint."""

from __future__ import annotations

import json
import logging
import os

import pandas as pd
import pytest
import torch
from torch import nn

from slidetrain.train.fingerprint import fingerprint_changes, input_fingerprint
from slidetrain.train.harness import Selection, run_epochs, write_run_files


class _Killed(Exception):
    pass


def toy_run(out, val_scores, selection, stop_after=None, epochs=None, inputs=None):
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

    result = run_epochs(
        out,
        "tag",
        epochs or len(val_scores),
        train_epoch,
        validate,
        {"model": model, "optimizers": [opt]},
        model.state_dict,
        selection,
        stop_hook=stop,
        inputs=inputs if inputs is not None else input_fingerprint([], {}),
    )
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
    model_pt = write_run_files(
        tmp_path / "killed", "toy", {"lr": 0.1}, 0, resumed, {"note": 1}, lambda best: {"state": best}
    )
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    run = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert run["epochs_run"] == 5 and run["note"] == 1 and run["selection"]["best"] == 0.7
    assert torch.equal(torch.load(model_pt)["state"]["weight"], whole.best_state["weight"])


def _without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_a_run_killed_after_its_stopping_epoch_does_not_train_further(tmp_path):
    scores = [0.5, 0.6, 0.55, 0.58, 0.57, 0.9, 0.95]  # patience 3: stops after epoch 5
    selection = Selection("val_auroc", patience=3)
    whole, whole_model = toy_run(tmp_path / "whole", scores, selection)
    assert len(whole.history) == 5
    with pytest.raises(_Killed):  # killed once the stopping epoch's checkpoint is on disk
        toy_run(tmp_path / "killed", scores, selection, stop_after=5)
    resumed, resumed_model = toy_run(tmp_path / "killed", scores, selection)
    assert _without_seconds(resumed.history) == _without_seconds(whole.history)
    assert torch.equal(whole_model.weight, resumed_model.weight)  # no sixth epoch trained
    assert resumed.best == whole.best == 0.6


def _touch_later(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_changed_inputs_start_over_and_say_why(tmp_path, caplog):
    data = tmp_path / "features"
    data.mkdir()
    files = [data / "a.h5", data / "b.h5"]
    for f in files:
        f.write_bytes(b"0123")
    scores = [0.5, 0.6, 0.55, 0.7]
    fp = input_fingerprint(files, {"k": 8})
    with pytest.raises(_Killed):
        toy_run(tmp_path / "run", scores, Selection("val_auroc"), stop_after=2, inputs=fp)
    # same inputs: resumes (only the two remaining epochs run)
    with pytest.raises(_Killed):
        toy_run(
            tmp_path / "run", scores, Selection("val_auroc"), stop_after=3, inputs=input_fingerprint(files, {"k": 8})
        )
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 3

    _touch_later(files[1])  # b.h5 regenerated: same size, newer
    caplog.set_level(logging.INFO)
    with pytest.raises(_Killed):
        toy_run(
            tmp_path / "run", scores, Selection("val_auroc"), stop_after=1, inputs=input_fingerprint(files, {"k": 8})
        )
    assert "inputs changed" in caplog.text and "modified since" in caplog.text and "b.h5" in caplog.text
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 1  # started over

    caplog.clear()
    whole, _ = toy_run(tmp_path / "whole", scores, Selection("val_auroc"))
    resumed, _ = toy_run(tmp_path / "run", scores, Selection("val_auroc"), inputs=input_fingerprint(files, {"k": 16}))
    assert "setting k: 8 -> 16" in caplog.text
    assert _without_seconds(resumed.history) == _without_seconds(whole.history)  # a whole fresh run


def test_fingerprint_changes_name_what_changed(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    old = input_fingerprint([a], {"tile_px": 256})
    assert fingerprint_changes(old, input_fingerprint([a], {"tile_px": 256})) == []
    a.write_bytes(b"xx")
    changes = fingerprint_changes(old, input_fingerprint([a, b], {"tile_px": 256}))
    assert any("changed size" in c and "a.h5" in c for c in changes)
    assert any("not read before" in c and "b.h5" in c for c in changes)
    assert fingerprint_changes(None, old) == ["the checkpoint carries no input fingerprint"]
    with pytest.raises(Exception, match="missing.h5"):
        input_fingerprint([tmp_path / "missing.h5"])
