"""Synthetic slides: sheet structure, determinism, OpenSlide readability, ground truth, learnability.

The learnability test is the contract the default pipeline relies on: lesion
tiles at 5x must be told apart from normal tissue, and high grade from low
grade, by colour/texture statistics simple enough for a randomly initialised
CNN to pick up.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from slidetrain.errors import SheetError
from slidetrain.wsi import synthetic
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.synthetic import (
    GRADE_NAMES,
    SyntheticSpec,
    pyramid_shapes,
    read_truth,
    render_canvas,
    synthetic_sheet,
    synthetic_spec,
    write_synthetic_slide,
)

SMALL = (2500, 3500)  # level-0 long side of test slides: quick to draw, still several 5x tiles
SLIDES_PER_CLASS = 4  # the first half trains the tile classifiers, the second half tests them


def _find_spec(prefix: str, label: str, want) -> SyntheticSpec:
    """The first spec f'{prefix}_{k}' satisfying `want` (specs are cheap; drawing is not)."""
    for k in range(500):
        spec = synthetic_spec(f"{prefix}_{k:03d}", label, seed=0, size_range_px=SMALL)
        if want(spec):
            return spec
    raise AssertionError(f"no spec for {prefix} within 500 ids")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, list[tuple[SyntheticSpec, Path, Path]]]:
    """Small slides on disk: SLIDES_PER_CLASS per grade plus one with pen marks and debris."""
    root = tmp_path_factory.mktemp("synthetic")
    specs: dict[str, list[SyntheticSpec]] = {
        label: [synthetic_spec(f"t_{label}_{k}", label, seed=0, size_range_px=SMALL) for k in range(SLIDES_PER_CLASS)]
        for label in GRADE_NAMES.values()
    }
    specs["pen"] = [_find_spec("pen", "low_grade", lambda s: s.has_pen and s.has_debris)]
    out: dict[str, list[tuple[SyntheticSpec, Path, Path]]] = {}
    for key, group in specs.items():
        out[key] = []
        for spec in group:
            tif, npz = root / f"{spec.slide_id}.tif", root / f"{spec.slide_id}.npz"
            write_synthetic_slide(tif, spec, truth_path=npz)
            out[key].append((spec, tif, npz))
    return out


# ----------------------------------------------------------------------------- sheet and spec


def test_sheet_is_deterministic_balanced_and_patient_grouped():
    sheet = synthetic_sheet(150, seed=3)
    assert list(sheet.columns) == ["slide_id", "patient_id", "label", "source"]
    assert sheet.equals(synthetic_sheet(150, seed=3))
    assert not sheet.equals(synthetic_sheet(150, seed=4))
    assert len(sheet) == 150 and sheet.slide_id.is_unique
    assert all(re.fullmatch(r"syn_\d{4}", s) for s in sheet.slide_id)
    assert all(re.fullmatch(r"pat_\d{3}", p) for p in sheet.patient_id)
    assert set(sheet.source) == {"synthetic"}
    counts = sheet.label.value_counts()
    assert set(counts.index) == set(GRADE_NAMES.values())
    assert counts.max() - counts.min() <= 3

    per_patient = sheet.groupby("patient_id").agg(n=("slide_id", "size"), labels=("label", "nunique"))
    assert set(per_patient.n) == {1, 2}
    assert (per_patient.labels == 1).all(), "both slides of a patient must share the label"
    share_two = (per_patient.n == 2).mean()
    assert 0.15 <= share_two <= 0.25  # two_slide_patient_fraction = 0.2 of patients


def test_sheet_scales_to_ten_thousand_slides():
    sheet = synthetic_sheet(10_616, seed=0)
    assert len(sheet) == 10_616 and sheet.slide_id.is_unique
    assert sheet.groupby("patient_id").label.nunique().max() == 1
    counts = sheet.label.value_counts()
    assert counts.max() - counts.min() <= 3
    assert synthetic_sheet(10, seed=0, two_slide_patient_fraction=0.0).patient_id.is_unique


def test_spec_is_a_pure_function_of_id_label_seed():
    a = synthetic_spec("syn_0001", "low_grade", seed=0)
    assert a == synthetic_spec("syn_0001", "low_grade", seed=0)
    assert a != synthetic_spec("syn_0001", "low_grade", seed=1)
    assert a.mpp == 0.5 and 3000 <= max(a.width_px, a.height_px) <= 6000
    # The label decides only the lesions, so nothing else leaks the class.
    n = synthetic_spec("syn_0001", "normal", seed=0)
    assert (n.width_px, n.height_px, n.has_pen, n.n_pieces) == (
        a.width_px,
        a.height_px,
        a.has_pen,
        a.n_pieces,
    )
    assert n.lesion_fraction == 0 and n.n_lesions == 0 and a.lesion_fraction > 0
    assert SyntheticSpec.from_dict(a.to_dict()) == a
    with pytest.raises(SheetError, match="unknown synthetic label"):
        synthetic_spec("syn_0001", "grade_3", seed=0)


def test_spec_frequencies_of_pen_and_debris():
    specs = [synthetic_spec(f"syn_{k:04d}", "normal", seed=0) for k in range(600)]
    assert 0.10 <= np.mean([s.has_pen for s in specs]) <= 0.20
    assert 0.15 <= np.mean([s.has_debris for s in specs]) <= 0.45
    assert {s.n_pieces for s in specs} == {1, 2, 3, 4}


def test_layout_fractions_over_many_specs():
    """Tissue covers 25-50% of the slide and lesions 5-30% of the tissue, for any spec."""
    for k in range(24):
        label = GRADE_NAMES[k % 3]
        spec = synthetic_spec(f"syn_{k:04d}", label, seed=7, size_range_px=SMALL)
        layout = synthetic._layout(spec)
        tissue, grade = layout.tissue, layout.lesion_grade
        assert 0.2 <= tissue.mean() <= 0.55, (spec.slide_id, tissue.mean())
        assert not (grade > 0)[~tissue].any(), "lesions lie inside tissue"
        share = (grade > 0).sum() / tissue.sum()
        if label == "normal":
            assert share == 0
        else:
            assert 0.05 <= share <= 0.30, (spec.slide_id, share)
            assert (grade == 2).any() == (label == "high_grade")
            assert (grade == 1).any() or label == "high_grade"


def test_pyramid_shapes():
    assert pyramid_shapes(2000, 1500) == [(1500, 2000), (750, 1000), (375, 500)]
    shapes = pyramid_shapes(40960, 30720)
    assert shapes[-1] == (480, 640) and len(shapes) == 7
    assert all(min(s) >= 500 for s in shapes[:-1])


# ----------------------------------------------------------------------------- files


def test_openslide_reads_levels_mpp_and_dimensions(slides):
    for spec, tif, _ in slides["normal"][:1] + slides["high_grade"][:1]:
        with open_slide(tif) as slide:
            assert slide.mpp_source == "metadata" and slide.mpp == pytest.approx(0.5)
            assert slide.handle.properties["openslide.vendor"] == "generic-tiff"
            assert float(slide.handle.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert slide.level_count >= 3
            assert slide.dimensions == (spec.width_px, spec.height_px)
            assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0), rel=1e-3)
            assert slide.nearest_level(slide.downsample_for_magnification(5.0)) == 2
            assert min(slide.level_dimensions[-1]) < 500
            # The same place at 20x and at 5x shows the same colours (levels agree).
            truth = read_truth(tif.with_suffix(".npz"))
            ys, xs = np.nonzero(ndimage.binary_erosion(truth["tissue"], iterations=4))
            x0, y0 = int(xs[len(xs) // 2]) * 16, int(ys[len(ys) // 2]) * 16
            at20 = slide.read_region((x0, y0), 0, (256, 256)).reshape(-1, 3).mean(0)
            at5 = slide.read_region((x0, y0), 2, (64, 64)).reshape(-1, 3).mean(0)
            assert np.abs(at20 - at5).max() < 8
            assert at20.mean() < 225, "a tissue location is not background"
            corner = slide.read_region((0, 0), 0, (64, 64))
            assert corner.mean() > 235, "glass is near-white"
            assert 0.5 < corner.std() < 8, "glass carries mild noise"


def test_same_spec_gives_same_pixels_and_no_temp_files(slides, tmp_path):
    spec, tif, npz = slides["low_grade"][0]
    again = tmp_path / "again.tif"
    write_synthetic_slide(again, spec, truth_path=tmp_path / "again.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "again.tif"]
    with open_slide(tif) as a, open_slide(again) as b:
        for level, xy, size in ((0, (1000, 800), (300, 200)), (2, (0, 0), a.level_dimensions[2])):
            assert np.array_equal(a.read_region(xy, level, size), b.read_region(xy, level, size))
    t1, t2 = read_truth(npz), read_truth(tmp_path / "again.npz")
    for key in ("tissue", "lesion", "artifact", "lesion_grade"):
        assert np.array_equal(t1[key], t2[key])
    assert SyntheticSpec.from_dict(t1["spec"]) == spec
    assert t1["downsample"] == 16.0
    assert t1["tissue"].shape == (-(-spec.height_px // 16), -(-spec.width_px // 16))


def test_canvas_does_not_depend_on_strip_size(monkeypatch):
    """Strips draw their random numbers from fixed row blocks, so they join seamlessly."""
    spec = synthetic_spec("strips", "high_grade", seed=0, size_range_px=(2000, 2000))
    whole = render_canvas(spec)
    monkeypatch.setattr(synthetic, "_strip_rows", lambda width: 64)
    assert np.array_equal(render_canvas(spec), whole)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    spec = synthetic_spec("broken", "normal", seed=0, size_range_px=(1000, 1000))

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_tiff", fail)
    with pytest.raises(RuntimeError):
        write_synthetic_slide(tmp_path / "x.tif", spec, truth_path=tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []


def test_ground_truth_fractions_on_written_slides(slides):
    for label in GRADE_NAMES.values():
        for spec, _, npz in slides[label]:
            truth = read_truth(npz)
            share = truth["lesion"].sum() / truth["tissue"].sum()
            if label == "normal":
                assert share == 0
            else:
                assert 0.05 <= share <= 0.30
            assert not (truth["lesion"] & ~truth["tissue"]).any()
            assert truth["artifact"].any() == (spec.has_pen or spec.has_debris)


def test_pen_marks_are_in_truth_and_in_pixels(slides):
    spec, tif, npz = slides["pen"][0]
    truth = read_truth(npz)
    pen = truth["pen"]
    assert pen.any() and truth["debris"].any()
    assert (truth["artifact"] >= pen).all() and (truth["artifact"] >= truth["debris"]).all()
    assert (pen & truth["tissue"]).any() and (pen & ~truth["tissue"]).any(), "pen crosses tissue and glass"
    with open_slide(tif) as slide:
        image = slide.read_level(2)[2::4, 2::4]  # (h, w, 3): 5x pixels at the truth cells' centres
    h, w = image.shape[:2]
    inked = ndimage.binary_erosion(pen[:h, :w], iterations=1)
    glass = ndimage.binary_erosion(~truth["tissue"][:h, :w] & ~truth["artifact"][:h, :w], iterations=3)
    assert image[inked].mean() < image[glass].mean() - 60, "ink is much darker than glass"


# ----------------------------------------------------------------------------- learnability


def _tile_features(tile: np.ndarray) -> np.ndarray:
    """Mean and std of RGB plus the share of dark pixels of one tile (128, 128, 3)."""
    pixels = tile.reshape(-1, 3).astype(np.float32)  # (N, 3)
    grey = pixels.mean(axis=1)
    return np.concatenate([pixels.mean(0), pixels.std(0), [(grey < 120).mean(), (grey < 80).mean()]])


def _sample_tiles(spec, tif, npz, rng, per_kind: int = 25) -> list[tuple[np.ndarray, str]]:
    """5x tiles of 128 px labelled from the truth: 'normal', 'low' or 'high' (by lesion grade)."""
    truth = read_truth(npz)
    cells = 128 * 4 // 16  # a 5x tile spans 32 truth cells
    tissue, grade, artifact = truth["tissue"], truth["lesion_grade"], truth["artifact"]

    def share(
        mask: np.ndarray,
    ) -> np.ndarray:  # share of each tile-sized window, indexed by top-left cell
        c = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image
        s = c[cells:, cells:] - c[:-cells, cells:] - c[cells:, :-cells] + c[:-cells, :-cells]
        return s / (cells * cells)  # (h - cells + 1, w - cells + 1)

    lesion_share, tissue_share, artifact_share = share(grade > 0), share(tissue), share(artifact)
    clean = artifact_share < 0.02
    kinds = {
        "normal": clean & (tissue_share > 0.8) & (lesion_share == 0),
        "low": clean & (lesion_share > 0.5) & (share(grade == 1) > 0.45),
        "high": clean & (lesion_share > 0.5) & (share(grade == 2) > 0.45),
    }
    out = []
    with open_slide(tif) as slide:
        level = slide.nearest_level(slide.downsample_for_magnification(5.0))
        for kind, ok in kinds.items():
            ys, xs = np.nonzero(ok)
            for i in rng.permutation(len(ys))[:per_kind]:
                tile = slide.read_region((int(xs[i]) * 16, int(ys[i]) * 16), level, (128, 128))
                out.append((_tile_features(tile), kind))
    return out


def _accuracy(train, test, positive: str, negatives: set[str]) -> float:
    def xy(rows):
        rows = [(f, k) for f, k in rows if k == positive or k in negatives]
        return np.array([f for f, _ in rows]), np.array([k == positive for _, k in rows])

    x_train, y_train = xy(train)
    x_test, y_test = xy(test)
    assert y_train.any() and (~y_train).any() and y_test.any() and (~y_test).any()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    return float((model.predict(x_test) == y_test).mean())


def test_lesion_and_grade_are_learnable_from_5x_tile_statistics(slides):
    """Held-out slides: tile colour/texture statistics separate lesion from normal and high from low."""
    rng = np.random.default_rng(0)
    half = SLIDES_PER_CLASS // 2
    train, test = [], []
    for label in GRADE_NAMES.values():
        for k, (spec, tif, npz) in enumerate(slides[label]):
            (train if k < half else test).extend(_sample_tiles(spec, tif, npz, rng))
    kinds = [k for _, k in test]
    assert min(kinds.count(kind) for kind in ("normal", "low", "high")) >= 10, "too few test tiles"
    assert _accuracy(train, test, "normal", {"low", "high"}) > 0.90
    assert _accuracy(train, test, "high", {"low"}) > 0.85
