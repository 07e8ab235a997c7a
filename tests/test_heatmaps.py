"""Per-slide heatmaps: the per-tile values plotted, where they land on the thumbnail, bounded reading, errors."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from slidetrain.errors import SlideError
from slidetrain.wsi import thumbnail as thumbnail_mod
from slidetrain.wsi.heatmap_run import heatmaps_for_run, write_gallery
from slidetrain.wsi.heatmaps import (
    box_fraction,
    lesion_auroc,
    paint_tiles,
    scale_values,
)
from slidetrain.wsi.thumbnail import Thumbnail, read_thumbnail, thumbnail_level
from slidetrain.wsi.tile import read_tiles_h5

SLIDES = {"hm_high": "high_grade", "hm_normal": "normal"}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Two small drawn slides, preprocessed as the pipeline does (sheet source: synthetic), and a split
    whose test part holds both."""
    from slidetrain.wsi.preprocess import preprocess_slide
    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide

    root = tmp_path_factory.mktemp("heatmaps")
    slides, results = root / "slides", root / "results"
    rows = []
    for sid, label in SLIDES.items():
        spec = synthetic_spec(sid, label, seed=5, size_range_px=(1800, 1800))
        write_synthetic_slide(slides / f"{sid}.tiff", spec, truth_path=slides / f"{sid}.truth.npz")
        preprocess_slide(
            slides / f"{sid}.tiff",
            sid,
            mask_png=results / "masks" / f"{sid}.mask.png",
            qc_path=results / "masks" / f"{sid}.qc.jpg",
            tiles_h5=results / "tiles" / f"{sid}.h5",
            image_path=results / "images" / f"{sid}.jpg",
            image_meta_json=results / "images" / f"{sid}.json",
            timings_json=results / "timings" / f"{sid}.json",
            target_magnification=5.0,
            tile_px=32,
            image_magnification=1.25,
        )
        rows.append({"slide_id": sid, "patient_id": f"p_{sid}", "label": label, "source": "synthetic"})
    sheet = root / "sheet.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    split = root / "split.csv"
    pd.DataFrame(rows).assign(part="test")[["slide_id", "patient_id", "label", "part"]].to_csv(split, index=False)
    return root, sheet, split


def lesion_share(root, sid: str) -> tuple[np.ndarray, np.ndarray]:
    """The tiles' coordinates and the share of each tile that is lesion in the truth (the test's own arithmetic)."""
    coords, attrs = read_tiles_h5(root / "results" / "tiles" / f"{sid}.h5")
    size = int(attrs["patch_size_level0"])
    with np.load(root / "slides" / f"{sid}.truth.npz") as z:
        lesion, ds = z["lesion"], float(z["downsample"])
    share = np.array(
        [
            lesion[int(y // ds) : int(np.ceil((y + size) / ds)), int(x // ds) : int(np.ceil((x + size) / ds))].mean()
            for x, y in coords
        ]
    )
    return coords, share


def write_attention(path, root, values_of) -> dict[str, np.ndarray]:
    """attention.h5 as evaluate writes it: one group per slide, values from `values_of(coords, share)`."""
    out = {}
    with h5py.File(path, "w") as f:
        for sid in SLIDES:
            coords, share = lesion_share(root, sid)
            values = values_of(coords, share)
            g = f.create_group(sid)
            g.create_dataset("attention", data=values)
            g.create_dataset("coords", data=coords)
            out[sid] = values
    return out


def run_heatmaps(root, sheet, split, attention, out_dir, **kw):
    return heatmaps_for_run(
        attention,
        "abmil",
        split,
        sheet,
        root / "slides",
        root / "results" / "tiles",
        root / "results" / "masks",
        out_dir,
        out_dir / "index.csv",
        truth_dir=root / "slides",
        max_px=256,
        **kw,
    )


def test_csv_holds_the_plotted_values_and_lesion_truth(tiny_dataset, tmp_path):
    root, sheet, split = tiny_dataset
    # attention = the tile's lesion share + a little noise: on lesion tiles it must come out higher
    rng = np.random.default_rng(0)
    given = write_attention(tmp_path / "attention.h5", root, lambda c, share: share + 0.01 * rng.random(len(share)))
    index = run_heatmaps(root, sheet, split, tmp_path / "attention.h5", tmp_path / "abmil")
    assert index.slide_id.tolist() == list(SLIDES)
    for sid, values in given.items():
        table = pd.read_csv(tmp_path / "abmil" / f"{sid}.csv")
        coords, share = lesion_share(root, sid)
        np.testing.assert_allclose(table.value, values, rtol=1e-5)
        np.testing.assert_array_equal(table[["x_level0", "y_level0"]].to_numpy(), coords)
        np.testing.assert_allclose(table.lesion_fraction, share, atol=1e-6)
        assert table.value_scaled.min() == pytest.approx(0) and table.value_scaled.max() == pytest.approx(1)
        png = Image.open(tmp_path / "abmil" / f"{sid}.png")
        assert png.format == "PNG" and min(png.size) > 100
    high = index.set_index("slide_id").loc["hm_high"]
    assert high.lesion_auroc > 0.95 and high.scaled_on_lesion > high.scaled_off_lesion
    assert np.isnan(index.set_index("slide_id").at["hm_normal", "lesion_auroc"])  # no lesion: nothing to rank


def test_missing_attention_file_names_the_slide(tiny_dataset, tmp_path):
    root, sheet, split = tiny_dataset
    with pytest.raises(SlideError, match="slide hm_high: attention file .*missing.h5 does not exist"):
        run_heatmaps(root, sheet, split, tmp_path / "missing.h5", tmp_path / "out")


def test_test_slide_absent_from_attention_is_an_error(tiny_dataset, tmp_path):
    root, sheet, split = tiny_dataset
    write_attention(tmp_path / "attention.h5", root, lambda c, share: share)
    with h5py.File(tmp_path / "attention.h5", "a") as f:
        del f["hm_normal"]
    with pytest.raises(SlideError, match="slide hm_normal: has no group in"):
        run_heatmaps(root, sheet, split, tmp_path / "attention.h5", tmp_path / "out")
    assert not (tmp_path / "out" / "index.csv").exists()  # no index that hides the missing slide


def test_multi_branch_attention_shows_the_predicted_class(tiny_dataset, tmp_path):
    root, sheet, split = tiny_dataset
    # branch 0 counts up, branch 1 counts down: the CSV must hold the predicted class's branch
    write_attention(
        tmp_path / "attention.h5",
        root,
        lambda c, share: np.stack([np.arange(len(share)), -np.arange(len(share))]).astype(float),
    )
    pred = pd.DataFrame(
        {
            "slide_id": list(SLIDES),
            "label": ["b", "a"],
            "predicted": ["b", "a"],
            "prob_a": [0.2, 0.9],
            "prob_b": [0.8, 0.1],
        }
    )
    pred.to_csv(tmp_path / "predictions.csv", index=False)
    index = run_heatmaps(
        root,
        sheet,
        split,
        tmp_path / "attention.h5",
        tmp_path / "out",
        predictions_csv=tmp_path / "predictions.csv",
        class_names=["a", "b"],
    )
    assert index.branch.tolist() == ["b", "a"]
    high = pd.read_csv(tmp_path / "out" / "hm_high.csv").value.to_numpy()
    normal = pd.read_csv(tmp_path / "out" / "hm_normal.csv").value.to_numpy()
    assert (np.diff(high) < 0).all() and (np.diff(normal) > 0).all()


def test_tile_values_land_on_their_thumbnail_pixels():
    thumb = Thumbnail(np.zeros((10, 20, 3), np.uint8), (8.0, 8.0), (160, 80), 0)
    coords = np.array([[0, 0], [32, 16], [96, 40]])  # level 0; tiles of 16 px = 2 thumbnail px
    heat = paint_tiles(np.array([0.1, 0.5, 0.9]), coords, 16, thumb)
    assert heat[0:2, 0:2].tolist() == [[0.1, 0.1], [0.1, 0.1]]
    assert np.all(heat[2:4, 4:6] == 0.5) and np.all(heat[5:7, 12:14] == 0.9)
    assert np.isnan(heat).sum() == heat.size - 12


def test_helpers_scale_fraction_auroc():
    assert scale_values(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]
    grid = np.zeros((4, 4), bool)
    grid[:2, :2] = True  # level-0 [0, 32) x [0, 32) at downsample 16
    np.testing.assert_allclose(box_fraction(grid, 16, np.array([[0, 0], [16, 0], [32, 32]]), 32), [1.0, 0.5, 0.0])
    assert lesion_auroc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])) == 1.0
    assert lesion_auroc(np.array([0.9, 0.1, 0.5]), np.array([False, True, False])) == 0.0


def test_thumbnail_level_is_near_the_wanted_size_and_cheap_to_read():
    pyramid = [(40960 // 2**i, 30720 // 2**i) for i in range(7)]
    assert pyramid[thumbnail_level(pyramid, 1024)] == (5120, 3840)  # / 5 = 1024 px, not 1280 / 2 = 640
    assert thumbnail_level([(100_000, 80_000)], 1024) == 0  # no pyramid: level 0, read in strips
    assert thumbnail_level([(500, 400), (250, 200)], 1024) == 0  # smaller than wanted: as it is


def test_thumbnail_is_read_in_bounded_strips(tiny_dataset, monkeypatch):
    root, _, _ = tiny_dataset
    path = root / "slides" / "hm_high.tiff"
    whole = read_thumbnail(path, "hm_high", max_px=300)
    from slidetrain.wsi.slide import Slide

    reads = []
    original = Slide.read_level_box

    def recording(self, level, x, y, width, height):
        reads.append(width * height)
        return original(self, level, x, y, width, height)

    monkeypatch.setattr(Slide, "read_level_box", recording)
    monkeypatch.setattr(thumbnail_mod, "STRIP_PX", 20_000)  # a few rows per strip
    strips = read_thumbnail(path, "hm_high", max_px=300)
    assert len(reads) > 5 and max(reads) <= 20_000 + 2 * max(whole.level0_dimensions)  # >= `factor` rows per strip
    np.testing.assert_array_equal(strips.rgb, whole.rgb)  # strips reduce without seams
    assert max(whole.rgb.shape[:2]) <= 300 and whole.downsample_xy[0] >= 1800 / 300


def test_gallery_embeds_every_heatmap(tiny_dataset, tmp_path):
    root, sheet, split = tiny_dataset
    write_attention(tmp_path / "attention.h5", root, lambda c, share: share)
    run_heatmaps(root, sheet, split, tmp_path / "attention.h5", tmp_path / "abmil")
    n = write_gallery([tmp_path / "abmil" / "index.csv"], tmp_path / "gallery.html", "Heatmaps of test")
    page = (tmp_path / "gallery.html").read_text()
    assert n == 2 and page.count("data:image/png;base64,") == 2 and "hm_normal" in page
