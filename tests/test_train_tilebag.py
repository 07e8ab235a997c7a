"""Tile-bag training end to end: run files, exact resume after a kill, frozen encoder, executors agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from _entry import ENTRY
from slidetrain.errors import SlideError
from slidetrain.train.tilebag import evaluate_tilebag, fit_tilebag

CLASSES = ["negative", "positive"]
SAMPLING = {"tile_px": 32, "target_magnification": 5.0}
PARAMS = {
    "backbone": "resnet18",
    "k": 6,
    "input_px": 32,
    "epochs": 2,
    "warmup_epochs": 1,
    "workers": 0,
    "slides_per_epoch": 0.75,
    "accumulation": 2,
    "selection_metric": "val_loss",
    "eval_tiles": "all",
    "eval_chunk": 16,
}


@pytest.fixture(scope="module")
def split(tiled_synthetic, tmp_path_factory):
    root, sheet, refs = tiled_synthetic
    labels = ["negative" if r.label == 0 else "positive" for r in refs]
    parts = ["train", "train", "train", "train", "val", "test"]
    frame = pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in refs],
            "patient_id": [f"p{i}" for i in range(6)],
            "label": labels,
            "part": parts,
        }
    )
    path = tmp_path_factory.mktemp("tilebag_split") / "split.csv"
    frame.to_csv(path, index=False)
    return path


def data_args(tiled_synthetic, split):
    root, sheet, _ = tiled_synthetic
    return {"split_csv": split, "sheet_csv": sheet, "slides_dir": root, "tiles_dir": root, "class_names": CLASSES}


def train_cli(out, tiled_synthetic, split, params, stop_after=None):
    root, sheet, _ = tiled_synthetic
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop_after is not None:
        env["SLIDETRAIN_STOP_AFTER_EPOCH"] = str(stop_after)
    cmd = [
        sys.executable,
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
        "2",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def history(out):
    h = pd.read_csv(out / "history.csv")
    return h.drop(columns=[c for c in h.columns if "seconds" in c or c == "tiles_per_second"])


def test_run_files_and_evaluation(tiled_synthetic, split, tmp_path):
    out = tmp_path / "run"
    fit_tilebag(PARAMS, sampling=SAMPLING, out_dir=out, seed=0, **data_args(tiled_synthetic, split))
    assert {p.name for p in out.iterdir()} == {"model.pt", "history.csv", "run.json"}
    h = pd.read_csv(out / "history.csv")
    assert h.epoch.tolist() == [1, 2] and h.train_loss.notna().all() and h.selected.any()
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "tilebag" and run["config"]["k"] == 6 and run["git_commit"]
    result = evaluate_tilebag(
        out / "model.pt",
        predictions_csv=out / "pred.csv",
        metrics_json=out / "m.json",
        attention_h5=out / "att.h5",
        n_bootstrap=10,
        **data_args(tiled_synthetic, split),
    )
    assert result["n_slides"] == 1
    import h5py

    with h5py.File(out / "att.h5") as f:
        (slide,) = f.keys()
        n = len(f[slide]["coords"])
        assert f[slide]["attention"].shape == (n,) and n > PARAMS["k"]  # all tiles of the test slide


def test_a_killed_run_resumes_to_the_same_result(tiled_synthetic, split, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    params = {**PARAMS, "epochs": 3, "workers": 1}
    assert train_cli(whole, tiled_synthetic, split, params).returncode == 0
    first = train_cli(killed, tiled_synthetic, split, params, stop_after=1)
    assert first.returncode == 137, first.stderr[-2000:]
    assert (killed / "checkpoint.pt").exists() and not (killed / "model.pt").exists()
    second = train_cli(killed, tiled_synthetic, split, params)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    pd.testing.assert_frame_equal(history(whole), history(killed))
    a = torch.load(whole / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (
        evaluate_tilebag(
            o / "model.pt",
            predictions_csv=o / "p.csv",
            metrics_json=o / "m.json",
            n_bootstrap=10,
            **data_args(tiled_synthetic, split),
        )
        for o in (whole, killed)
    )
    assert json.dumps(ea["metrics"]) == json.dumps(eb["metrics"])


def test_frozen_encoder_trains_the_aggregator_only(tiled_synthetic, split, tmp_path):
    from slidetrain.train.tilebag import tilebag_config
    from slidetrain.train.tilebag.model import build_tilebag_model

    out = tmp_path / "frozen"
    params = {**PARAMS, "encoder": "frozen"}
    fit_tilebag(params, sampling=SAMPLING, out_dir=out, seed=0, **data_args(tiled_synthetic, split))
    saved = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    initial = build_tilebag_model(tilebag_config(params), 2, seed=0).state_dict()
    enc = [k for k in initial if k.startswith("encoder.")]
    assert any("running_mean" in k for k in enc)
    assert all(torch.equal(initial[k], saved[k]) for k in enc)  # weights and BatchNorm statistics
    agg = [k for k in initial if k.startswith("aggregator.")]
    assert not all(torch.equal(initial[k], saved[k]) for k in agg)  # the aggregator did learn


def test_two_stage_executor_trains_like_plain(tiled_synthetic, split, tmp_path):
    params = {**PARAMS, "epochs": 1, "aggregator_params": {"dropout": 0.0}}
    for name in ("plain", "two_stage"):
        fit_tilebag(
            {**params, "executor": name},
            sampling=SAMPLING,
            out_dir=tmp_path / name,
            seed=0,
            **data_args(tiled_synthetic, split),
        )
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "two_stage" / "model.pt", weights_only=False)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_sampled_evaluation_repeats_are_reproducible(tiled_synthetic, split, tmp_path):
    out = tmp_path / "run"
    params = {**PARAMS, "epochs": 1, "eval_tiles": "sampled", "eval_repeats": 3, "eval_k": 4}
    fit_tilebag(params, sampling=SAMPLING, out_dir=out, seed=0, **data_args(tiled_synthetic, split))
    for name in ("a", "b"):
        evaluate_tilebag(
            out / "model.pt",
            predictions_csv=out / f"{name}.csv",
            metrics_json=out / f"{name}.json",
            n_bootstrap=10,
            **data_args(tiled_synthetic, split),
        )
    pd.testing.assert_frame_equal(pd.read_csv(out / "a.csv"), pd.read_csv(out / "b.csv"))
    m = json.loads((out / "a.json").read_text())
    assert m["repeats"]["n"] == 3 and m["repeats"]["mode"] == "sampled"


def test_a_slide_without_tiles_stops_training_naming_it(tiled_synthetic, split, tmp_path):
    import shutil

    import numpy as np

    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import write_tiles_h5

    root, sheet, refs = tiled_synthetic
    tiles = tmp_path / "tiles"
    shutil.copytree(root, tiles, ignore=shutil.ignore_patterns("*.tsv"))
    with open_slide(refs[1].slide_path) as slide:
        write_tiles_h5(
            tiles / f"{refs[1].slide_id}.h5",
            np.zeros((0, 2)),
            slide=slide,
            target_magnification=5.0,
            tile_px=32,
            overlap_px=0,
        )
    args = {**data_args(tiled_synthetic, split), "tiles_dir": tiles}
    with pytest.raises(SlideError, match=refs[1].slide_id):
        fit_tilebag({**PARAMS, "slides_per_epoch": 1.0}, sampling=SAMPLING, out_dir=tmp_path / "o", seed=0, **args)
