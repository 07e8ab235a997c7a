"""A foundation-model entry through frozen features and MIL training: the tiny ViT with weights the test saves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from slidetrain.data.splits import write_split  # noqa: E402
from slidetrain.errors import WeightsError  # noqa: E402
from slidetrain.models.encoders import build_encoder, encoder_dim  # noqa: E402
from slidetrain.models.foundation import build_foundation  # noqa: E402
from slidetrain.wsi.features import FeatureJob, extract_features, read_features  # noqa: E402


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_test.safetensors"
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in build_foundation("vit_tiny_test", seed=5).model.state_dict().items()}, str(path)
    )
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_hook_builds_foundation_models(tiny_weights):
    path, digest = tiny_weights
    enc = build_encoder("vit_tiny_test", str(path), sha256=digest)
    assert enc.dim == encoder_dim("vit_tiny_test") == 96
    assert encoder_dim("virchow2") == 2560 and encoder_dim("conch_v15") == 768
    with pytest.raises(WeightsError, match="vit_tiny_test"):
        build_encoder("vit_tiny_test", str(path), sha256="f" * 64)


def test_tiny_vit_features_then_mil_training(tiled_synthetic, tiny_weights, tmp_path):
    root, _, refs = tiled_synthetic
    path, digest = tiny_weights
    out_dir = tmp_path / "features" / "vit_tiny_test"
    jobs = [FeatureJob(r.slide_id, r.slide_path, r.tiles_h5, out_dir / f"{r.slide_id}.h5") for r in refs]
    rows = extract_features(jobs, "vit_tiny_test", str(path), batch_size=32, sha256=digest)
    assert len(rows) == len(refs)
    ref = build_foundation("vit_tiny_test", str(path))
    for job in jobs:
        features, coords = read_features(job.out_h5)
        assert features.shape == (len(coords), 96) and np.isfinite(features).all() and features.std() > 0
    # the features are the registry encoder's, through its own transform (32 px tiles read at the card's 32 px)
    from slidetrain.wsi.encode import TileEncoder
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import read_tiles, read_tiles_h5

    coords, attrs = read_tiles_h5(refs[0].tiles_h5)
    with open_slide(refs[0].slide_path, refs[0].slide_id) as slide:
        tiles = np.stack(
            list(read_tiles(slide, coords[:4], float(attrs["target_magnification"]), int(attrs["patch_size"])))
        )
    want = TileEncoder(ref, torch.device("cpu"))(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(read_features(jobs[0].out_h5)[0][:4], want, rtol=1e-4, atol=1e-5)

    # MIL training and evaluation on them
    classes = ["normal", "graded"]
    split_rows = [
        {
            "slide_id": r.slide_id,
            "patient_id": f"p_{r.slide_id}",
            "label": classes[r.label],
            "part": "train" if i < 4 else ("val" if i == 4 else "test"),
        }
        for i, r in enumerate(refs)
    ]
    split_rows[5]["part"], split_rows[3]["part"] = "test", "train"
    split_csv = tmp_path / "split.csv"
    write_split(pd.DataFrame(split_rows), split_csv)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "slidetrain.cli",
        "train-mil",
        "--method",
        "abmil",
        "--params",
        json.dumps({"epochs": 2}),
        "--split",
        str(split_csv),
        "--features",
        str(out_dir),
        "--classes",
        *classes,
        "--out",
        str(run),
        "--seed",
        "0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.pt").exists()
