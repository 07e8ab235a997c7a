"""The tile-bag trainer on ranks (`executor: distributed`) against one process (`plain`).

torchrun --standalone --nproc-per-node 3 (gloo on CPU: rank 0 aggregator, 2 encoder ranks with
4 of each slide's 8 tiles) runs `slidetrain train-tilebag`; with `sync_bn: true` its model.pt
and history must equal fit_tilebag's with `executor: plain` on the same data and seed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from _entry import ENTRY
from slidetrain.data.tilebag import read_coords
from slidetrain.train.tilebag import evaluate_tilebag, fit_tilebag

pytestmark = pytest.mark.equivalence

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["negative", "positive"]
SAMPLING = {"tile_px": 32, "target_magnification": 5.0}
PARAMS = {
    "backbone": "resnet18",
    "k": 8,
    "input_px": 64,
    "epochs": 2,
    "warmup_epochs": 1,
    "workers": 0,
    "slides_per_epoch": 0.75,
    "accumulation": 2,
    "selection_metric": "val_loss",
    "eval_tiles": "all",
    "eval_chunk": 4,
    "lr": 1e-3,
    "aggregator_params": {"dropout": 0.0},
    "dtype": "float64",
}
# float64, no dropout (as the paper's equivalence run): two exact computations of the same training
# agree to rounding over every step, on any CPU. In float32 they would drift apart by the CPU's
# rounding and by ReLU branches flipped near their kinks (a random ResNet18 on few tiny tiles is
# ill-conditioned: BatchNorm over 6 values per channel in its last stage), by an amount that depends
# on the CPU's kernels (docs/reproducibility.md).
RANKED = {**PARAMS, "executor": "distributed", "sync_bn": True}


@pytest.fixture(scope="module")
def split(tiled_synthetic, tmp_path_factory):
    _, _, refs = tiled_synthetic
    frame = pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in refs],
            "patient_id": [f"p{i}" for i in range(6)],
            "label": ["negative" if r.label == 0 else "positive" for r in refs],
            "part": ["train", "train", "train", "train", "val", "test"],
        }
    )
    path = tmp_path_factory.mktemp("ranked_split") / "split.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def plain_run(tiled_synthetic, split, tmp_path_factory):
    root, sheet, _ = tiled_synthetic
    out = tmp_path_factory.mktemp("ranked_plain") / "run"
    fit_tilebag(
        PARAMS,
        split_csv=split,
        sheet_csv=sheet,
        slides_dir=root,
        tiles_dir=root,
        class_names=CLASSES,
        sampling=SAMPLING,
        out_dir=out,
        seed=0,
    )
    return out


def torchrun_train(
    out: Path, tiled_synthetic, split, params: dict, env_extra: dict | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess:
    root, sheet, _ = tiled_synthetic
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), **(env_extra or {})}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=3",
        ENTRY,
        "train-tilebag",
        "--params",
        json.dumps(params),
        "--split",
        str(split),
        "--sheet",
        str(sheet),
        "--slides-dir",
        str(root),
        "--tiles-dir",
        str(root),
        "--tile-px",
        "32",
        "--target-magnification",
        "5",
        "--classes",
        *CLASSES,
        "--out",
        str(out),
        "--seed",
        "0",
        "--backend",
        "gloo",
        "--timeout-s",
        str(timeout_s),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def assert_same_run(a: Path, b: Path, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    sa = torch.load(a / "model.pt", weights_only=False)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=False)["state_dict"]
    assert set(sa) == set(sb)
    for k in sa:  # encoder and aggregator weights, BatchNorm running statistics, num_batches_tracked
        torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=k)
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    for column in ("train_loss", "val_loss", "val_auroc", "lr", "weight_decay", "selected"):
        assert hb[column].tolist() == pytest.approx(ha[column].tolist(), rel=1e-9, abs=1e-12, nan_ok=True), column


def test_ranked_training_equals_one_process(tiled_synthetic, split, plain_run, tmp_path):
    out = tmp_path / "ranked"
    proc = torchrun_train(out, tiled_synthetic, split, RANKED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(plain_run, out)
    run = json.loads((out / "run.json").read_text())
    assert run["launch"]["world_size"] == 3 and run["launch"]["k_per_encoder_rank"] == 4
    assert not (out / "checkpoint.pt").exists()


def test_ranked_without_sync_bn_differs_from_one_process(tiled_synthetic, split, plain_run, tmp_path):
    """The authors' setting (each rank's BatchNorm sees its 4 tiles): a different model, so the check can fail."""
    out = tmp_path / "ranked"
    proc = torchrun_train(out, tiled_synthetic, split, {**RANKED, "sync_bn": False})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(AssertionError):
        assert_same_run(plain_run, out)


def test_killed_rank_fails_naming_it_and_a_rerun_resumes(tiled_synthetic, split, plain_run, tmp_path):
    out = tmp_path / "ranked"
    # 3 slides per epoch: step 5 is in epoch 2, after epoch 1's checkpoint
    proc = torchrun_train(out, tiled_synthetic, split, RANKED, {"SLIDETRAIN_RANK_FAULT": "kill:2:5"})
    assert proc.returncode != 0
    assert re.search(r"Root Cause[\s\S]*?rank\s*:\s*2 ", proc.stderr), proc.stderr[-3000:]
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    assert len(pd.read_csv(out / "history.csv")) == 1

    proc = torchrun_train(out, tiled_synthetic, split, RANKED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert_same_run(plain_run, out)  # exact resume: epoch 2 continues from the saved state of every rank


def test_distributed_validation_normalises_as_one_process_test_scoring(tiled_synthetic, split, tmp_path):
    """eval_bn: bag on the ranks: each encoder rank holds half of the validation slide's tiles, in
    several chunks; their BatchNorm statistics are merged over both ranks, so rank 0 scores the slide
    as `evaluate-tilebag` does in one process with every tile. The validation part is one slide, so
    its loss (-log p of its label) pins its probabilities; predictions.csv holds them rounded to
    float32 (PredictionCollector), hence the tolerance (each rank's chunks normalised by their own
    statistics, as before, moved p from 0.983 to 0.9999 here)."""
    root, sheet, refs = tiled_synthetic
    out = tmp_path / "ranked"
    params = {**RANKED, "sync_bn": False, "eval_bn": "bag", "epochs": 1, "eval_chunk": 8, "input_px": 16}
    proc = torchrun_train(out, tiled_synthetic, split, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    val_loss = pd.read_csv(out / "history.csv")["val_loss"].item()

    frame = pd.read_csv(split)
    frame["part"] = frame["part"].replace({"val": "test", "test": "val"})  # the validation slide, scored as a test
    as_test = tmp_path / "val_as_test.csv"
    frame.to_csv(as_test, index=False)
    val_ref = refs[4]
    assert len(read_coords(val_ref)) > 4 * params["eval_chunk"]  # each rank's share takes several chunks
    evaluate_tilebag(
        out / "model.pt",
        as_test,
        sheet,
        root,
        root,
        CLASSES,
        tmp_path / "predictions.csv",
        tmp_path / "metrics.json",
        n_bootstrap=10,
    )
    row = pd.read_csv(tmp_path / "predictions.csv").set_index("slide_id").loc[val_ref.slide_id]
    assert row[f"prob_{CLASSES[val_ref.label]}"] == pytest.approx(math.exp(-val_loss), rel=1e-7)
