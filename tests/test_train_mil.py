"""The frozen-feature training harness: resume after a kill, selection on validation only, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _entry import ENTRY
from slidetrain.data.splits import write_split
from slidetrain.wsi.features import write_features

CLASSES = ["a", "b", "c"]


@pytest.fixture
def bag_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """36 bags whose class is carried by a minority of instances (a real MIL problem)."""
    rng = np.random.default_rng(0)
    features_dir = tmp_path / "features"
    rows = []
    for i in range(36):
        label = i % 3
        n = int(rng.integers(20, 60))
        x = rng.normal(size=(n, 16)).astype(np.float32)
        k = max(2, n // 6)
        x[:k, label] += 3.0  # the evidence: a few instances shifted along the class's axis
        write_features(features_dir / f"s{i:02d}.h5", x, np.zeros((n, 2), np.int64), {"seconds": 0.0})
        part = "train" if i < 24 else ("val" if i < 30 else "test")
        rows.append({"slide_id": f"s{i:02d}", "patient_id": f"p{i:02d}", "label": CLASSES[label], "part": part})
    split_csv = tmp_path / "split.csv"
    write_split(pd.DataFrame(rows), split_csv)
    return split_csv, features_dir


def train(
    out: Path,
    split_csv: Path,
    features_dir: Path,
    method: str = "abmil",
    epochs: int = 5,
    stop_after: int | None = None,
    params: dict | None = None,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop_after is not None:
        env["SLIDETRAIN_STOP_AFTER_EPOCH"] = str(stop_after)
    params = {"epochs": epochs, **({"dropout": 0.25} if method == "abmil" else {}), **(params or {})}
    cmd = [
        sys.executable,
        ENTRY,
        "train-mil",
        "--method",
        method,
        "--params",
        json.dumps(params),
        "--split",
        str(split_csv),
        "--features",
        str(features_dir),
        "--classes",
        *CLASSES,
        "--out",
        str(out),
        "--seed",
        "3",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def evaluate(out: Path, split_csv: Path, features_dir: Path) -> dict:
    from slidetrain.train.mil import evaluate_mil

    return evaluate_mil(
        out / "model.pt",
        split_csv,
        features_dir,
        CLASSES,
        out / "pred.csv",
        out / "metrics.json",
        attention_h5=out / "attention.h5",
        n_bootstrap=10,
    )


def test_killed_run_resumes_to_the_same_result(bag_dataset, tmp_path):
    split_csv, features_dir = bag_dataset
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train(whole, split_csv, features_dir).returncode == 0
    first = train(killed, split_csv, features_dir, stop_after=2)
    assert first.returncode == 137, first.stderr[-2000:]
    assert (killed / "checkpoint.pt").exists() and not (killed / "model.pt").exists()
    assert len(pd.read_csv(killed / "history.csv")) == 2
    second = train(killed, split_csv, features_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    h_whole, h_killed = pd.read_csv(whole / "history.csv"), pd.read_csv(killed / "history.csv")
    pd.testing.assert_frame_equal(h_whole.drop(columns="seconds"), h_killed.drop(columns="seconds"))
    a = torch.load(whole / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert evaluate(whole, split_csv, features_dir)["metrics"] == evaluate(killed, split_csv, features_dir)["metrics"]
    assert not (killed / "checkpoint.pt").exists()


def test_training_learns_and_writes_provenance(bag_dataset, tmp_path):
    split_csv, features_dir = bag_dataset
    out = tmp_path / "run"
    proc = train(out, split_csv, features_dir, epochs=15)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = pd.read_csv(out / "history.csv")
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]
    assert history.selected.sum() >= 1
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 3 and run["method"] == "abmil" and run["config"]["epochs"] == 15
    assert run["git_commit"]
    result = evaluate(out, split_csv, features_dir)
    assert result["n_slides"] == 6 and result["bootstrap_unit"] == "patient"  # CIs resample the split's patients
    assert result["metrics"]["accuracy"] > 0.5  # chance is 1/3
    import h5py

    with h5py.File(out / "attention.h5") as f:
        assert len(f.keys()) == 6
        for g in f.values():
            assert np.isclose(g["attention"][:].sum(), 1.0, atol=1e-4)


def test_a_changed_config_does_not_resume_a_stale_checkpoint(bag_dataset, tmp_path):
    split_csv, features_dir = bag_dataset
    out = tmp_path / "run"
    assert train(out, split_csv, features_dir, epochs=4, stop_after=2).returncode == 137
    proc = train(out, split_csv, features_dir, epochs=3)
    assert proc.returncode == 0
    assert "ignoring" in proc.stderr and "resuming" not in proc.stderr
    assert len(pd.read_csv(out / "history.csv")) == 3


def test_unknown_config_key_names_the_method_and_key():
    from slidetrain.errors import ConfigError
    from slidetrain.models import method_config

    with pytest.raises(ConfigError, match=r"methods\.abmil.*learning_rate"):
        method_config("abmil", {"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        method_config("nosuch", {})


@pytest.mark.parametrize("method", ["milrnn", "gma"])
def test_binary_task_trains_milrnn_and_gma(tmp_path, method):
    """MIL-RNN (binary only) and GMA through the real harness on a two-class task."""
    rng = np.random.default_rng(1)
    features_dir = tmp_path / "features"
    rows = []
    for i in range(30):
        label = i % 2
        n = int(rng.integers(12, 40))
        x = rng.normal(size=(n, 16)).astype(np.float32)
        if label:
            x[: max(2, n // 5), 0] += 4.0
        write_features(features_dir / f"b{i:02d}.h5", x, np.zeros((n, 2), np.int64), {"seconds": 0.0})
        part = "train" if i < 20 else ("val" if i < 24 else "test")
        rows.append({"slide_id": f"b{i:02d}", "patient_id": f"p{i:02d}", "label": ["neg", "pos"][label], "part": part})
    split_csv = tmp_path / "split.csv"
    write_split(pd.DataFrame(rows), split_csv)
    from slidetrain.train.mil import evaluate_mil, fit_mil

    # MIL-RNN: the reference's RNN batch of 128 slides is one step per epoch on 20 slides; 4 gives the
    # 4 RNN epochs here 20 steps (the size scaled, the algorithm unchanged)
    params = (
        {"epochs": 8, "lr": 1e-3, "rnn_batch": 4}
        if method == "milrnn"
        else {"epochs": 8, "optimizer": "adam", "lr": 1e-3}
    )
    out = tmp_path / method
    fit_mil(method, params, split_csv, features_dir, ["neg", "pos"], out, seed=0)
    history = pd.read_csv(out / "history.csv")
    result = evaluate_mil(
        out / "model.pt", split_csv, features_dir, ["neg", "pos"], out / "p.csv", out / "m.json", n_bootstrap=10
    )
    if method == "milrnn":  # selection only in the RNN stage (epochs 5-8)
        assert not history.selected.iloc[:4].any() and history.selected.iloc[4:].any()
        # each stage lowers its training loss; the reference's RNN recipe (SGD lr 0.1) fits 20 training
        # slides within 4 epochs and overfits them, so no test AUROC bound is claimed for it here
        assert history.train_loss.iloc[3] < history.train_loss.iloc[0]
        assert history.train_loss.iloc[7] < history.train_loss.iloc[4]
        assert np.isfinite(result["metrics"]["auroc"])
    else:
        assert result["metrics"]["auroc"] >= 0.75


def test_milrnn_refuses_a_three_class_task():
    from slidetrain.errors import ConfigError
    from slidetrain.models import build_model, method_config

    with pytest.raises(ConfigError, match="binary tasks only"):
        build_model("milrnn", 16, 3, method_config("milrnn", {}))


def test_feature_stats_match_the_concatenated_statistics():
    from slidetrain.data.bags import Bag
    from slidetrain.train.mil import feature_stats, normalise_bags

    rng = np.random.default_rng(0)
    bags = [
        Bag(f"s{i}", 0, torch.from_numpy(rng.normal(5, 3, size=(n, 4)).astype(np.float32)), np.zeros((n, 2)))
        for i, n in enumerate([3, 10, 7])
    ]
    x = torch.cat([b.features for b in bags])
    mean, std = feature_stats(bags, "standardize")
    assert torch.allclose(mean, x.mean(0), atol=1e-5) and torch.allclose(std, x.std(0), atol=1e-5)
    z = torch.cat([b.features for b in normalise_bags(bags, (mean, std))])
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(z.std(0), torch.ones(4), atol=1e-4)
    assert feature_stats(bags, "none") is None


def test_a_run_killed_after_its_stopping_epoch_finishes_on_resume(bag_dataset, tmp_path):
    split_csv, features_dir = bag_dataset
    patience = {"early_stopping_patience": 2}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train(whole, split_csv, features_dir, epochs=40, params=patience).returncode == 0
    n = len(pd.read_csv(whole / "history.csv"))
    assert n < 40  # it did stop early
    assert train(killed, split_csv, features_dir, epochs=40, params=patience, stop_after=n).returncode == 137
    second = train(killed, split_csv, features_dir, epochs=40, params=patience)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "stopped early after epoch" in second.stderr
    h_whole, h_killed = pd.read_csv(whole / "history.csv"), pd.read_csv(killed / "history.csv")
    pd.testing.assert_frame_equal(h_whole.drop(columns="seconds"), h_killed.drop(columns="seconds"))
    a = torch.load(whole / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_feature_files_start_over_and_say_why(bag_dataset, tmp_path):
    split_csv, features_dir = bag_dataset
    out = tmp_path / "run"
    assert train(out, split_csv, features_dir, epochs=4, stop_after=2).returncode == 137
    regenerated = features_dir / "s05.h5"  # a training slide's features written again
    st = regenerated.stat()
    os.utime(regenerated, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    proc = train(out, split_csv, features_dir, epochs=4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inputs changed" in proc.stderr and "s05.h5" in proc.stderr and "resuming" not in proc.stderr
    assert len(pd.read_csv(out / "history.csv")) == 4


def _stops_where_patience_says(history: pd.DataFrame, patience: int) -> bool:
    """True when the run ended at the first epoch with `patience` epochs since the last selection."""
    stale = 0
    for i, selected in enumerate(history.selected):
        stale = 0 if selected else stale + 1
        if stale >= patience:
            return i == len(history) - 1
    return False


def test_dsmil_selects_on_accuracy_plus_auc_and_stops_early(bag_dataset, tmp_path):
    from slidetrain.train.mil import fit_mil

    split_csv, features_dir = bag_dataset
    out = tmp_path / "dsmil"
    fit_mil(
        "dsmil", {"epochs": 40, "early_stopping_patience": 3, "lr": 1e-3}, split_csv, features_dir, CLASSES, out, seed=0
    )
    history = pd.read_csv(out / "history.csv")
    assert np.allclose(history.val_acc_auroc, (history.val_accuracy + history.val_auroc) / 2)
    assert len(history) < 40 and _stops_where_patience_says(history, 3)
    best = history.val_acc_auroc[history.selected].iloc[-1]
    assert best == history.val_acc_auroc.max()
    run = json.loads((out / "run.json").read_text())
    assert run["selection"]["metric"] == "val_acc_auroc" and run["config"]["prediction"] == "bag"


def test_dtfd_reference_selection_only_in_the_last_fifth(bag_dataset, tmp_path):
    from slidetrain.train.mil import fit_mil

    split_csv, features_dir = bag_dataset
    out = tmp_path / "dtfd"
    fit_mil("dtfd", {"epochs": 5, "selection": "reference"}, split_csv, features_dir, CLASSES, out, seed=0)
    history = pd.read_csv(out / "history.csv")
    assert history.selected.tolist() == [False, False, False, False, True]  # epoch 5 of 5: the last 20%
    assert json.loads((out / "run.json").read_text())["selection"]["metric"] == "val_auroc"


def test_weighted_sample_balances_classes(bag_dataset, tmp_path):
    from slidetrain.data.bags import Bag
    from slidetrain.train.mil import balanced_sampling_weights, fit_mil

    bags = [Bag(f"s{i}", label, torch.zeros(1, 2), np.zeros((1, 2))) for i, label in enumerate([0, 0, 0, 1])]
    p = balanced_sampling_weights(bags, 2)
    assert np.allclose(p, [1 / 6, 1 / 6, 1 / 6, 1 / 2])  # each class drawn half the time
    split_csv, features_dir = bag_dataset
    out = tmp_path / "clam"
    fit_mil(
        "clam_sb",
        {"epochs": 2, "weighted_sample": True, "inst_loss": "svm"},
        split_csv,
        features_dir,
        CLASSES,
        out,
        seed=0,
    )
    assert len(pd.read_csv(out / "history.csv")) == 2
