"""Features other tools wrote (TRIDENT's and CLAM's layouts) train MIL methods without re-extraction,
and slidetrain's own feature files open the way those tools read theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidetrain.data.bags import load_bags
from slidetrain.data.splits import write_split
from slidetrain.errors import SlideError, SlidetrainError
from slidetrain.wsi.external_features import external_feature_index, read_slide_features
from slidetrain.wsi.features import write_features

CLASSES = ["a", "b"]


def _bag(i: int, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    n = 10 + i
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[: n // 4, i % 2] += 3.0
    coords = (rng.integers(0, 100, size=(n, 2)) * 256).astype(np.int64)
    return x, coords


def write_trident(folder, slide_id, features, coords):
    """TRIDENT's layout: {job}/20x_256px_0px_overlap/features_{encoder}/{slide}.h5, geometry on `coords`."""
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{slide_id}.h5", "w") as f:
        f.create_dataset("features", data=features)
        f["features"].attrs["name"] = slide_id
        c = f.create_dataset("coords", data=coords)
        for k, v in {
            "patch_size": 256,
            "patch_size_level0": 512,
            "level0_magnification": 40,
            "target_magnification": 20,
            "overlap": 0,
            "name": slide_id,
        }.items():
            c.attrs[k] = v


def write_clam(folder, slide_id, features, coords, pt: bool = True):
    """CLAM's layout: h5_files/{slide}.h5 (features, coords with patch_level/patch_size) and pt_files/{slide}.pt."""
    (folder / "h5_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "h5_files" / f"{slide_id}.h5", "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=coords)
        c.attrs["patch_level"], c.attrs["patch_size"] = 0, 256
    if pt:
        (folder / "pt_files").mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(features), folder / "pt_files" / f"{slide_id}.pt")


def test_trident_and_clam_layouts_read(tmp_path):
    x, c = _bag(1)
    write_trident(tmp_path / "trident" / "20x_256px_0px_overlap" / "features_uni_v1", "s1", x, c)
    f, k = read_slide_features(tmp_path / "trident" / "20x_256px_0px_overlap" / "features_uni_v1", "s1")
    np.testing.assert_array_equal(f, x)
    np.testing.assert_array_equal(k, c)
    write_clam(tmp_path / "clam", "s1", x, c)
    f, k = read_slide_features(tmp_path / "clam", "s1")
    np.testing.assert_array_equal(f, x)
    np.testing.assert_array_equal(k, c)
    (tmp_path / "clam" / "h5_files" / "s1.h5").unlink()  # the .pt alone: features, no coordinates
    f, k = read_slide_features(tmp_path / "clam", "s1")
    np.testing.assert_array_equal(f, x)
    assert (k == -1).all()


def test_missing_slide_and_other_dimension_are_named(tmp_path):
    folder = tmp_path / "features_uni_v1"
    for i in range(3):
        write_trident(folder, f"s{i}", *_bag(i))
    with pytest.raises(SlidetrainError, match="slide s9"):
        load_bags(["s0", "s9"], [0, 1], folder)
    write_trident(folder, "s2", *_bag(2, dim=16))
    with pytest.raises(SlideError, match="slide s2.*dimension 16, expected 24"):
        load_bags(["s0", "s1", "s2"], [0, 1, 0], folder)
    with pytest.raises(SlideError, match="s2"):
        external_feature_index(folder, ["s0", "s1", "s2"], tmp_path / "index.csv", dim=24)


def test_the_index_lists_every_missing_slide_and_rejects_an_empty_file(tmp_path):
    folder = tmp_path / "features_uni_v1"
    for i in (0, 2):
        write_trident(folder, f"s{i}", *_bag(i))
    with pytest.raises(SlideError, match=r"slide s1: no feature file in .*features_uni_v1.*2 of 4 slides.*'s1', 's3'"):
        external_feature_index(folder, ["s0", "s1", "s2", "s3"], tmp_path / "index.csv")
    write_trident(folder, "s1", np.zeros((0, 24), np.float32), np.zeros((0, 2), np.int64))
    with pytest.raises(SlideError, match=r"slide s1: .*s1\.h5 holds no tiles"):
        external_feature_index(folder, ["s0", "s1", "s2"], tmp_path / "index.csv")
    assert not (tmp_path / "index.csv").exists()
    # shapes come from the h5 headers (TRIDENT's files, CLAM's h5_files/ and a pt_files/ tensor alike)
    write_trident(folder, "s1", *_bag(1))
    write_clam(folder, "s3", *_bag(3))
    (folder / "h5_files" / "s3.h5").unlink()
    index = external_feature_index(folder, ["s0", "s1", "s2", "s3"], tmp_path / "index.csv")
    want = [len(read_slide_features(folder, s)[0]) for s in ("s0", "s1", "s2", "s3")]
    assert index.n_tiles.tolist() == want and (index["dim"] == 24).all()
    assert str(index.path.tolist()[-1]).endswith("pt_files/s3.pt")


def test_ours_open_in_their_layout(tmp_path):
    x, c = _bag(3)
    write_features(tmp_path / "s3.h5", x, c, {"encoder": "uni", "weights": "none"})
    # TRIDENT / CLAM read features with h5py: f["features"][:] (N, D) and f["coords"][:] (N, 2)
    with h5py.File(tmp_path / "s3.h5", "r") as f:
        assert f["features"].shape == x.shape and f["features"].dtype == np.float32
        assert f["coords"].shape == (len(x), 2)
        np.testing.assert_array_equal(f["features"][:], x)
        np.testing.assert_array_equal(f["coords"][:], c)
    # and our reader takes the same file in a CLAM-style h5_files folder
    (tmp_path / "clam" / "h5_files").mkdir(parents=True)
    (tmp_path / "s3.h5").rename(tmp_path / "clam" / "h5_files" / "s3.h5")
    np.testing.assert_array_equal(read_slide_features(tmp_path / "clam", "s3")[0], x)


def test_mil_trains_on_trident_features(tmp_path):
    folder = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    rows = []
    for i in range(12):
        write_trident(folder, f"s{i:02d}", *_bag(i))
        rows.append(
            {
                "slide_id": f"s{i:02d}",
                "patient_id": f"p{i:02d}",
                "label": CLASSES[i % 2],
                "part": "train" if i < 8 else ("val" if i < 10 else "test"),
            }
        )
    split_csv = tmp_path / "split.csv"
    write_split(pd.DataFrame(rows), split_csv)
    index = external_feature_index(folder, [r["slide_id"] for r in rows], tmp_path / "index.csv")
    assert (index["dim"] == 24).all()
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
        str(folder),
        "--classes",
        *CLASSES,
        "--out",
        str(tmp_path / "run"),
        "--seed",
        "0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").exists()
