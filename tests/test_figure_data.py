"""Every figure writes the data it plots as a CSV beside its PNG; these tests assert on that data (the
series drawn, their number of points, finite values), not on the PNG's size. The tile-bag figures are
checked in tests/test_tilebag_outputs.py."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from slidetrain.paper.figure_data import FIGURE_DATA_COLUMNS, FigureData


def points(data: pd.DataFrame, panel: str) -> dict[str, int]:
    return data[data.panel == panel].groupby("series").size().to_dict()


def test_figure_data_rejects_series_of_unequal_length():
    with pytest.raises(ValueError, match="a/s: 2 x values but 3 y values"):
        FigureData().add("a", "s", [1, 2], [1.0, 2.0, 3.0])


def test_offload_figure_writes_one_series_per_kind(tmp_path):
    from slidetrain.paper.offload_figure import offload_figure

    sides = [1024, 2048, 4096]
    rows = [
        {
            "image_side": s,
            "config": c,
            "seconds_mean": 0.1 * i + s / 1e4,
            "seconds_std": 0.01,
            "peak_device_gb": 1.0,
            "device": "cpu",
        }
        for i, c in enumerate(("plain", "save_on_cpu"))
        for s in sides[:2]
    ]
    rows += [
        {
            "image_side": s,
            "config": f"offload_{n}",
            "seconds_mean": s / 1e3,
            "seconds_std": 0.02,
            "peak_device_gb": 1.0,
            "device": "cpu",
        }
        for n, s in enumerate(sides, 1)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "sweep.csv", index=False)
    offload_figure(tmp_path / "sweep.csv", tmp_path / "figure2.png")
    data = pd.read_csv(tmp_path / "figure2.csv")
    assert list(data.columns) == FIGURE_DATA_COLUMNS
    assert points(data, "a") == {"plain": 2, "save_on_cpu": 2, "offload (ours)": 3}
    assert np.isfinite(data[["x", "y", "y_low", "y_high"]].to_numpy(float)).all()
    offload = data[data.series == "offload (ours)"].sort_values("x")
    assert offload.x.tolist() == sides and offload.y.tolist() == pytest.approx([1.024, 2.048, 4.096])
    assert (offload.y_high - offload.y_low).tolist() == pytest.approx([0.04] * 3)  # +- one std band


def test_distributed_figure3_writes_each_panel_per_model(tmp_path):
    from slidetrain.bench.distributed_equivalence import equivalence_figure

    rows = []
    for model in ("toy", "resnet"):
        for step in (1, 2, 3):
            for tensor in ("conv1", "fc"):
                rows.append(
                    {
                        "model": model,
                        "step": step,
                        "tensor": f"{tensor} param",
                        "normalized_l1": 1e-7 * step,
                        "abs_difference": "",
                        "fp32_noise": 1e-8,
                    }
                )
                rows.append(
                    {
                        "model": model,
                        "step": step,
                        "tensor": f"{tensor} grad",
                        "normalized_l1": 0.0,
                        "abs_difference": "",
                        "fp32_noise": 1e-8,
                    }
                )
            rows.append(
                {
                    "model": model,
                    "step": step,
                    "tensor": "loss",
                    "normalized_l1": 0.0,
                    "abs_difference": 1e-9,
                    "fp32_noise": 1e-9,
                }
            )
    equivalence_figure(rows, tmp_path / "figure3.png")
    data = pd.read_csv(tmp_path / "figure3.csv")
    assert set(data.panel) == {f"{m}: {k}" for m in ("toy", "resnet") for k in ("param", "loss", "grad")}
    noise = "plain fp32 vs float64 (largest)"
    assert points(data, "toy: param") == {"conv1": 3, "fc": 3, noise: 3}
    assert points(data, "resnet: loss") == {"loss": 3}
    assert np.isfinite(data.y).all() and (data.y > 0).all()  # exact zeros are drawn on the log axis' floor
    assert data[data.panel == "toy: grad"].y.max() == pytest.approx(1e-8)  # the zeros at the floor, the noise line


def _attention_run(tmp_path, n_tiles: int = 6):
    """A run, its Table 1 and two 5x slide images with tile coordinates: what the attention figure reads."""
    run = tmp_path / "runs" / "abmil" / "mccv0" / "0"
    run.mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "tiles").mkdir()
    pd.DataFrame(
        [{"method": "abmil", "dataset": "syn", "auroc": 0.9}, {"method": "clam_sb", "dataset": "syn", "auroc": 0.8}]
    ).to_csv(tmp_path / "table1.csv", index=False)
    slides = {"s_a": "a", "s_b": "b"}
    pd.DataFrame(
        [
            {
                "slide_id": s,
                "label": c,
                "predicted": c,
                "prob_a": 0.9 if c == "a" else 0.1,
                "prob_b": 0.1 if c == "a" else 0.9,
            }
            for s, c in slides.items()
        ]
    ).to_csv(run / "predictions.csv", index=False)
    rng = np.random.default_rng(0)
    coords = np.array([[64 * (i % 3), 64 * (i // 3)] for i in range(n_tiles)])  # level-0 corners (N, 2)
    with h5py.File(run / "attention.h5", "w") as att:
        for s in slides:
            att.create_dataset(f"{s}/attention", data=rng.random(n_tiles).astype(np.float32))
            att.create_dataset(f"{s}/coords", data=coords)
    for s in slides:
        Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "images" / f"{s}.jpg")
        (tmp_path / "images" / f"{s}.json").write_text(json.dumps({"level0_bbox": [0, 0, 192, 128], "downsample": 4}))
        with h5py.File(tmp_path / "tiles" / f"{s}.h5", "w") as t:
            t.create_dataset("coords", data=coords).attrs["patch_size_level0"] = 64
    return slides, coords


def test_attention_figure_writes_the_drawn_attention_per_tile(tmp_path):
    from slidetrain.paper.figures import ATTENTION_DATA_COLUMNS, attention_figure

    slides, coords = _attention_run(tmp_path)
    method = attention_figure(
        "syn",
        tmp_path / "table1.csv",
        tmp_path / "runs",
        tmp_path / "images",
        tmp_path / "tiles",
        None,
        ["a", "b"],
        ["abmil", "clam_sb"],
        tmp_path / "attention.png",
    )
    assert method == "abmil"  # the best attention method of Table 1
    data = pd.read_csv(tmp_path / "attention.csv")
    assert list(data.columns) == ATTENTION_DATA_COLUMNS
    assert data.groupby("slide_id").size().to_dict() == {s: len(coords) for s in slides}  # every tile, per slide
    assert (data.groupby("slide_id").truth.first() == pd.Series(slides)).all()  # one slide per class
    assert np.isfinite(data.attention).all() and data.attention.between(0, 1).all()
    assert data.groupby("slide_id").attention.max().tolist() == pytest.approx([1.0, 1.0])  # relative to the max
