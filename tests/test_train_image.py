"""The whole-image training harness (train/wholeimage/loop.py): outputs, exact resume, train-only statistics, errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _entry import ENTRY
from slidetrain.configs.image import WholeImageConfig
from slidetrain.data.splits import write_split
from slidetrain.errors import SlideError
from slidetrain.train import common
from slidetrain.train.wholeimage import loop
from slidetrain.train.wholeimage.interface import WholeImageLearner
from slidetrain.train.wholeimage.loop import (
    evaluate_whole_image,
    fit_whole_image,
    load_images,
    load_trained,
    norm_stats_of,
    predict_images,
)
from slidetrain.train.wholeimage.oom import crop_edges
from slidetrain.train.wholeimage.registry import LEARNERS, LearnerSpec

CLASSES = ["red", "blue"]
TRAIN_IDS = [f"s{i:02d}" for i in range(6)]
VAL_IDS = ["s06", "s07"]
IMAGE_E2E = {"epochs": 2, "accumulation": 2, "lr_backbone": 1e-4, "lr_heads": 1e-3}


def blob_image(label: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8: white background, a red (class 0) or blue (class 1) disc of random size and place."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.15, 0.3) * size) ** 2
    image = np.full((size, size, 3), 245.0)
    image[disc] = [200, 60, 80] if label == 0 else [70, 80, 200]
    return (image + rng.normal(0, 6, image.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """12 slides of 64 px: 6 train, 2 val, 4 test, classes alternating."""
    root = tmp_path_factory.mktemp("images_dataset")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        Image.fromarray(blob_image(i % 2, rng)).save(images / f"s{i:02d}.jpg", quality=92)
        (images / f"s{i:02d}.json").write_text(json.dumps({"size": [64, 64]}))
        part = "train" if i < 6 else ("val" if i < 8 else "test")
        rows.append({"slide_id": f"s{i:02d}", "patient_id": f"p{i:02d}", "label": CLASSES[i % 2], "part": part})
    split_csv = root / "split.csv"
    write_split(pd.DataFrame(rows), split_csv)
    return split_csv, images


@pytest.fixture
def own_images(dataset, tmp_path) -> Path:
    """A copy of the images a test may change."""
    return Path(shutil.copytree(dataset[1], tmp_path / "images"))


def train_cli(
    out: Path, split_csv: Path, images: Path, method: str, params: dict, seed: int = 3, stop_after: int | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stop_after is not None:
        env["SLIDETRAIN_STOP_AFTER_EPOCH"] = str(stop_after)
    cmd = [
        sys.executable,
        ENTRY,
        "train-image",
        "--method",
        method,
        "--params",
        json.dumps(params),
        "--split",
        str(split_csv),
        "--images",
        str(images),
        "--classes",
        *CLASSES,
        "--out",
        str(out),
        "--seed",
        str(seed),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def evaluate(out: Path, split_csv: Path, images: Path) -> dict:
    return evaluate_whole_image(
        out / "model.pt", split_csv, images, CLASSES, out / "pred.csv", out / "metrics.json", n_bootstrap=10
    )


def history_without_time(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv").drop(columns="seconds")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_a_run_writes_every_file_and_scores_the_test_part(dataset, tmp_path):
    split_csv, images = dataset
    out = tmp_path / "image_e2e"
    model_path = fit_whole_image(
        "image_e2e", {**IMAGE_E2E, "class_weights": [1.0, 2.0]}, split_csv, images, CLASSES, out, seed=0
    )
    assert model_path == out / "model.pt"
    assert {p.name for p in out.iterdir()} == {"model.pt", "history.csv", "run.json"}  # checkpoint removed
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == [
        "epoch",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_auroc",
        "lr",
        "seconds",
        "selected",
        "cropped",
    ]
    assert history.epoch.tolist() == [1, 2] and history.selected.iloc[0]
    assert history.cropped.isna().all()  # nothing ran out of memory
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "image_e2e" and run["seed"] == 0 and run["config"]["selection_metric"] == "val_loss"
    assert run["epochs_run"] == 2 and run["class_names"] == CLASSES and run["git_commit"]
    assert run["image_sizes"]["train"]["n"] == 6 and run["image_sizes"]["val"]["n"] == 2

    # model.pt holds the selected epoch: its class-weighted validation loss is that row's
    learner, saved = load_trained(model_path)
    assert set(saved) == {"method", "config", "class_names", "state", "norm_stats"}
    val_loss, _ = predict_images(learner, load_images(VAL_IDS, images), [0, 1], saved["norm_stats"], [1.0, 2.0])
    assert val_loss == pytest.approx(history.val_loss[history.selected].iloc[-1], rel=1e-5)

    result = evaluate(out, split_csv, images)
    pred = pd.read_csv(out / "pred.csv")
    assert list(pred.columns) == ["slide_id", "label", "predicted", "prob_red", "prob_blue"]
    assert pred.slide_id.tolist() == ["s08", "s09", "s10", "s11"]
    assert np.allclose(pred[["prob_red", "prob_blue"]].sum(axis=1), 1, atol=1e-5)
    assert result["n_slides"] == 4 and json.loads((out / "metrics.json").read_text())["n_slides"] == 4


def test_a_killed_run_resumes_to_the_same_result(dataset, tmp_path):
    split_csv, images = dataset
    # accumulation 4 over 6 training slides: the last 2 slides' gradients carry into the next epoch's
    # first step (no step at an epoch's end, as the reference), so the checkpoint must hold them
    params = {**IMAGE_E2E, "n_patch": 2, "accumulation": 4}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    fit_whole_image("local_k4", params, split_csv, images, CLASSES, whole, seed=3)  # uninterrupted, in-process
    first = train_cli(killed, split_csv, images, "local_k4", params, stop_after=1)
    assert first.returncode == 137, first.stderr[-2000:]
    assert (killed / "checkpoint.pt").exists() and not (killed / "model.pt").exists()
    assert len(pd.read_csv(killed / "history.csv")) == 1
    second = train_cli(killed, split_csv, images, "local_k4", params)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming" in second.stderr
    pd.testing.assert_frame_equal(history_without_time(whole), history_without_time(killed))
    a = torch.load(whole / "model.pt", weights_only=False)
    b = torch.load(killed / "model.pt", weights_only=False)
    assert_same_state(a["state"], b["state"])  # the selected weights (history equal: the resumed training too)
    assert "optimizer" not in a["state"] and "grads" not in a["state"]  # model.pt keeps weights only
    assert evaluate(whole, split_csv, images)["metrics"] == evaluate(killed, split_csv, images)["metrics"]
    assert not (killed / "checkpoint.pt").exists()


def test_the_optimiser_steps_only_every_accumulation_slides(dataset, tmp_path, monkeypatch):
    """6 training slides, accumulation 4, 2 epochs: steps after slides 4 and 10, none at an epoch's end."""
    from slidetrain.train.wholeimage.image_e2e_learner import ImageE2ELearner

    steps = []
    real_step = ImageE2ELearner.step

    def counting_step(self):
        steps.append(sum(p.grad is not None for p in self.net.parameters()))
        real_step(self)

    monkeypatch.setattr(ImageE2ELearner, "step", counting_step)
    split_csv, images = dataset
    fit_whole_image("image_e2e", {**IMAGE_E2E, "accumulation": 4}, split_csv, images, CLASSES, tmp_path / "run", seed=0)
    assert len(steps) == 2
    assert steps[0] == steps[1] > 0  # each step had gradients to apply


class _Killed(Exception):
    pass


def test_a_checkpoint_of_another_seed_is_ignored(dataset, tmp_path, monkeypatch, caplog):
    split_csv, images = dataset

    def stop(epoch_done: int) -> None:  # an in-process "kill" that leaves the checkpoint behind
        if epoch_done == 1:
            raise _Killed

    out, fresh = tmp_path / "run", tmp_path / "fresh"
    with monkeypatch.context() as m:
        m.setattr(common, "after_epoch_checkpoint", stop)
        with pytest.raises(_Killed):
            fit_whole_image("image_e2e", IMAGE_E2E, split_csv, images, CLASSES, out, seed=3)
    assert (out / "checkpoint.pt").exists()
    with caplog.at_level(logging.INFO, logger="slidetrain.train.wholeimage.loop"):
        fit_whole_image("image_e2e", IMAGE_E2E, split_csv, images, CLASSES, out, seed=4)
    assert "ignoring" in caplog.text and "resuming" not in caplog.text
    fit_whole_image("image_e2e", IMAGE_E2E, split_csv, images, CLASSES, fresh, seed=4)
    pd.testing.assert_frame_equal(history_without_time(out), history_without_time(fresh))
    assert_same_state(
        torch.load(out / "model.pt", weights_only=False)["state"],
        torch.load(fresh / "model.pt", weights_only=False)["state"],
    )


def test_normalisation_statistics_come_from_the_train_part_only(dataset, own_images, tmp_path):
    split_csv, _ = dataset
    train_only = norm_stats_of(load_images(TRAIN_IDS, own_images))
    black = Image.new("RGB", (64, 64))
    for slide_id in ("s06", "s09"):  # a val and a test slide: had they leaked in, the statistics would move
        black.save(own_images / f"{slide_id}.jpg")
    fit_whole_image("image_e2e", {**IMAGE_E2E, "epochs": 1}, split_csv, own_images, CLASSES, tmp_path / "run", seed=0)
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=False)["norm_stats"] == train_only
    black.save(own_images / "s02.jpg")  # a train slide does move them
    assert norm_stats_of(load_images(TRAIN_IDS, own_images))["mean"][0] < train_only["mean"][0]


def test_a_missing_or_broken_image_names_the_slide(dataset, own_images, tmp_path, capsys):
    split_csv, _ = dataset
    (own_images / "s03.jpg").unlink()
    with pytest.raises(SlideError, match=r"slide s03: .*s03\.jpg is missing"):
        fit_whole_image("image_e2e", IMAGE_E2E, split_csv, own_images, CLASSES, tmp_path / "run", seed=0)
    from slidetrain.cli import main

    argv = [
        "train-image",
        "--method",
        "image_e2e",
        "--split",
        str(split_csv),
        "--images",
        str(own_images),
        "--classes",
        *CLASSES,
        "--out",
        str(tmp_path / "cli"),
    ]
    assert main(argv) == 2
    assert "slide s03" in capsys.readouterr().err
    (own_images / "s05.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SlideError, match=r"slide s05: .*s05\.jpg cannot be read"):
        load_images(["s04", "s05"], own_images)


class _CroppingLearner(WholeImageLearner):
    """Mean colour -> linear; reports every slide as cropped after an out-of-memory error (on_oom: crop)."""

    def __init__(self, n_classes: int, cfg: WholeImageConfig, device="cpu"):
        self.cfg = cfg
        self.linear = torch.nn.Linear(3, n_classes)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=0.1)

    def train_slide(self, image, label):
        image = crop_edges(image)
        loss = F.cross_entropy(self.linear(image.mean((1, 2)))[None], torch.tensor([label]))
        (loss / self.cfg.accumulation).backward()
        return {
            "loss": loss.item(),
            "image_h": float(image.shape[1]),
            "image_w": float(image.shape[2]),
            "oom_crops": 1.0,
        }

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def end_epoch(self, epoch, val_loss):
        pass

    @torch.no_grad()
    def predict(self, image):
        return torch.softmax(self.linear(image.mean((1, 2))), 0)

    def state_dict(self):
        return {"learner": type(self).__name__, "model": self.linear.state_dict()}

    def load_state_dict(self, state):
        self._check_learner_tag(state)
        self.linear.load_state_dict(state["model"])

    load_weights = load_state_dict


def test_slides_trained_on_a_crop_are_listed_in_the_history(dataset, tmp_path, monkeypatch):
    split_csv, images = dataset
    monkeypatch.setitem(LEARNERS, "cropping", LearnerSpec(WholeImageConfig, _CroppingLearner))
    fit_whole_image("cropping", {"epochs": 2, "accumulation": 2}, split_csv, images, CLASSES, tmp_path, seed=0)
    for entries in pd.read_csv(tmp_path / "history.csv").cropped:
        sizes = dict(e.split(":") for e in entries.split(";"))
        assert sorted(sizes) == TRAIN_IDS  # every slide, none dropped
        assert all(int(h) < 64 and int(w) < 64 for h, w in (s.split("x") for s in sizes.values()))


def test_a_diverged_run_stops_with_a_clear_error(dataset, tmp_path, monkeypatch):
    """Non-finite validation probabilities stop the run naming the method and epoch, not a bare ValueError."""
    from slidetrain.errors import TrainingError

    split_csv, images = dataset
    real = loop.predict_images

    def diverged(*args, **kwargs):
        loss, probs = real(*args, **kwargs)
        return loss, np.full_like(probs, np.nan)

    monkeypatch.setattr(loop, "predict_images", diverged)
    with pytest.raises(TrainingError, match=r"image_e2e: training diverged in epoch 1"):
        fit_whole_image("image_e2e", {**IMAGE_E2E, "epochs": 1}, split_csv, images, CLASSES, tmp_path / "run", seed=0)
    assert not (tmp_path / "run" / "model.pt").exists()
