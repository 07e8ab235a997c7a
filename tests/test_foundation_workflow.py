"""A foundation-model encoder through the workflow, from weights files the test saves with the key prefixes
published checkpoints carry: Table 1 on frozen features (`features.encoder`) and Campanella et al.'s table
with the encoder trained end to end (target `e2e_table1`, the old name of results/tables/tilebag_table1.csv),
on a tiny config.

The encoder is `vit_tiny_test`, the registry's two-block ViT of the timm ViT family (UNI's arguments at a
tiny width); both targets share one working directory, so the slides are drawn and preprocessed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidetrain.models.foundation import build_foundation
from slidetrain.wsi.encode import TileEncoder
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.synthetic import synthetic_sheet
from slidetrain.wsi.tile import read_tiles, read_tiles_h5

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow

ENCODER = "vit_tiny_test"
K = 4  # tiles per slide per step of the one tile-bag run (tilebag_k4)
N_SLIDES = 12


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    cmd += ["--configfile", str(workdir / "config" / "config.yaml"), "--cores", "2", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def save_published(root: Path, prefix: str, name: str, seed: int) -> tuple[Path, str]:
    """The encoder's state dict under a published checkpoint's wrapper prefix, as a torch file: (path, sha256)."""
    state = build_foundation(ENCODER, seed=seed).model.state_dict()
    path = root / name
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def foundation_config(features: tuple[Path, str], tilebag: tuple[Path, str]) -> dict:
    """tests/data/tiny_config.yaml with the foundation model in `features` and in a one-run tile-bag block."""
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_config.yaml").read_text())
    config["features"].update(encoder=ENCODER, weights=str(features[0]), sha256=features[1])
    config["derived_datasets"] = {
        "synthetic_binary": {
            "from": "synthetic",
            "classes": ["negative", "positive"],
            "label_map": {"normal": "negative", "low_grade": "positive", "high_grade": "positive"},
        }
    }
    config["table1"] = {"datasets": ["synthetic"], "methods": ["abmil"]}
    config["shards"] = {"slides_per_shard": N_SLIDES}  # one job per step: process start-ups dominate at this size
    config["table4"] = {"datasets": ["synthetic"], "methods": ["local_k4"]}
    config["tilebag"] = {
        "datasets": ["synthetic_binary"],
        "k_sweep": [K],
        "paper_k": [50],
        "splits": 1,
        "strategies": {},
        "strategy_k": [],
        "frozen_methods": [],  # Table 1 covers the frozen features; here the trained encoder only
        "params": {
            "backbone": ENCODER,
            "weights": str(tilebag[0]),
            "weights_sha256": tilebag[1],
            "input_px": 32,  # the card's input size: no resize in the step
            "freeze_blocks": 1,  # the patch embedding and the first block stay as loaded
            "layer_decay": 0.8,
            "epochs": 1,
            "warmup_epochs": 0,
            "optimizer": "adamw",
            "lr": 1.0e-3,
            "weight_decay": 0.0,
            "weight_decay_end": None,
            "slides_per_epoch": 1.0,
            "workers": 0,
            "eval_chunk": 64,
        },
    }
    return config


@pytest.fixture(scope="module")
def foundation_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("foundation")
    (work / "config" / "sheets").mkdir(parents=True)
    weights = work / "weights"
    weights.mkdir()
    # open_clip's wrapping (visual.trunk.) for the frozen features, DDP's (module.) for the trained encoder
    features = save_published(weights, "visual.trunk.", "pytorch_model.bin", seed=5)
    tilebag = save_published(weights, "module.", "checkpoint.pth", seed=6)
    config = foundation_config(features, tilebag)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    synthetic_sheet(N_SLIDES, seed=3).to_csv(work / "config" / "sheets" / "synthetic.tsv", sep="\t", index=False)
    snakemake(work, "results/tables/table1.csv", "e2e_table1")  # e2e_table1: tilebag_table1.csv's alias target
    return work, features, tilebag


def test_table1_on_frozen_features_of_the_foundation_model(foundation_run):
    work, (weights, digest), _ = foundation_run
    table = pd.read_csv(work / "results" / "tables" / "table1.csv")
    assert table.method.tolist() == ["abmil"] and table.dataset.tolist() == ["synthetic"]
    assert table.auroc.between(0, 1).all()
    folder = work / "results" / "synthetic" / "features" / ENCODER
    index = pd.read_csv(folder / "index.csv")
    assert len(index) == N_SLIDES
    slide = index.slide_id[0]
    with h5py.File(folder / f"{slide}.h5", "r") as f:
        assert f["features"].shape[1] == 96  # the tiny ViT's class token
        assert f.attrs["encoder"] == ENCODER and str(weights) in str(f.attrs["weights"])
        stored = f["features"][:4]
    # the features are the saved weights' (their prefix stripped), not a random init's
    coords, attrs = read_tiles_h5(work / "results" / "synthetic" / "tiles" / f"{slide}.h5")
    with open_slide(work / "resources" / "synthetic" / "slides" / f"{slide}.tiff", slide) as s:
        tiles = np.stack(
            list(read_tiles(s, coords[:4], float(attrs["target_magnification"]), int(attrs["patch_size"])))
        )
    encoder = TileEncoder(build_foundation(ENCODER, str(weights), sha256=digest), torch.device("cpu"))
    np.testing.assert_allclose(stored, encoder(torch.from_numpy(tiles)).numpy(), rtol=1e-4, atol=1e-5)
    run = json.loads((work / "results" / "synthetic" / "runs" / "abmil" / "mccv0" / "0" / "run.json").read_text())
    assert f"features/{ENCODER}" in json.dumps(run)


def test_e2e_table1_with_the_foundation_model_trained(foundation_run):
    work, _, (weights, digest) = foundation_run
    table = pd.read_csv(work / "results" / "tables" / "tilebag_table1.csv")
    assert table.algorithm.tolist() == ["Proposed"] and table.k.tolist() == [K]
    assert table.strategy.tolist() == ["single"] and table.n_splits.tolist() == [1]
    assert table.auc_mean.between(0, 100).all() and (table.paper_auc_mean > 0).all()  # beside the paper's K = 50
    run = work / "results" / "synthetic_binary" / "runs" / f"tilebag_k{K}" / "mccv0" / "0"
    provenance = json.loads((run / "run.json").read_text())
    text = json.dumps(provenance)
    assert ENCODER in text and str(weights) in text and digest in text
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and history.train_loss.notna().all()
    # trained: the encoder's last block moved away from the loaded weights, the frozen first block did not
    loaded = build_foundation(ENCODER, str(weights), sha256=digest).model.state_dict()
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    encoder = {k.removeprefix("encoder.model."): v for k, v in state.items() if k.startswith("encoder.model.")}
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
    assert not torch.equal(encoder["blocks.1.attn.qkv.weight"], loaded["blocks.1.attn.qkv.weight"])
