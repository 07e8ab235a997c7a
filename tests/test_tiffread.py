"""The tifffile reader (wsi/tiffread.py) gives OpenSlide's pixels, and the reading benchmark compares both."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from slidetrain.bench.read_speed import bench_read
from slidetrain.errors import SlideError
from slidetrain.wsi.image import extract_slide_image, read_scaled
from slidetrain.wsi.mask import mask_params, segment_tissue
from slidetrain.wsi.slide import open_slide

#: grey levels two JPEG decoders may differ by
JPEG_TOLERANCE = 4


def boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Level boxes (x, y, w, h): whole level, an interior box off the tile grid, boxes over the edges."""
    return [
        (0, 0, width, height),
        (37, 91, min(700, width - 37), min(500, height - 91)),
        (width - 100, height - 50, 300, 200),  # past the right and bottom edges: white
        (-20, -10, 64, 48),  # before the top-left corner
    ]


def assert_same_reads(path, mpp_fallback=None) -> None:
    with (
        open_slide(path, mpp_fallback=mpp_fallback) as a,
        open_slide(path, mpp_fallback=mpp_fallback, reader="auto", threads=2) as b,
    ):
        assert a.tiff is None and b.tiff is not None  # the fast path is taken, not silently skipped
        for level in range(a.level_count):
            ds = a.level_downsamples[level]
            for x, y, w, h in boxes(*a.level_dimensions[level]):
                xy0 = (round(x * ds), round(y * ds))
                ra, rb = a.read_region(xy0, level, (w, h)), b.read_region(xy0, level, (w, h))
                assert ra.shape == rb.shape == (h, w, 3)
                diff = np.abs(ra.astype(int) - rb.astype(int))
                assert diff.max() <= JPEG_TOLERANCE, (level, x, y, diff.max())
                assert diff.mean() < 0.5
            # a level-0 position between level pixels: OpenSlide's sub-pixel read, the same pixels
            if level > 0:
                xy0 = (round(37 * ds) + 1, round(91 * ds) + 1)
                ra, rb = a.read_region(xy0, level, (50, 40)), b.read_region(xy0, level, (50, 40))
                assert np.array_equal(ra, rb)
        # an area-averaged read at a downsample between levels goes through the same reads
        ra, _ = read_scaled(a, 3.0)
        rb, _ = read_scaled(b, 3.0)
        assert np.abs(ra.astype(int) - rb.astype(int)).max() <= JPEG_TOLERANCE


def test_synthetic_tiff_reads_equal_openslide(synthetic_slides):
    for path, _, _ in synthetic_slides[:2]:
        assert_same_reads(path)


def test_aperio_svs_reads_equal_openslide(aperio_svs):
    assert_same_reads(aperio_svs)


def test_slide_image_equals_openslide(synthetic_slides):
    path = synthetic_slides[0][0]
    with open_slide(path) as a, open_slide(path, reader="auto") as b:
        tissue = segment_tissue(a, mask_params("default"))
        ia, ma = extract_slide_image(a, tissue, 5.0)
        ib, mb = extract_slide_image(b, tissue, 5.0)
    assert ma == mb and np.abs(ia.astype(int) - ib.astype(int)).max() <= JPEG_TOLERANCE


def test_an_unknown_reader_is_an_error(synthetic_slides):
    with pytest.raises(SlideError, match="reader"):
        open_slide(synthetic_slides[0][0], reader="fast")


def test_bench_read_writes_every_reader_with_its_threads(synthetic_slides, tmp_path):
    out = tmp_path / "read.csv"
    bench_read([synthetic_slides[0][0]], out, threads=2, repeats=1)
    table = pd.read_csv(out)
    assert list(table.reader) == ["openslide", "openslide_threads", "auto"]
    assert list(table.backend) == ["openslide", "openslide", "tifffile"] and list(table.threads) == [1, 2, 2]
    assert (table.mpx_per_s > 0).all() and table.speedup.iloc[0] == 1.0
    assert (table.max_abs_diff <= JPEG_TOLERANCE).all()


def test_a_box_off_the_level_grid_is_read_by_tifffile_alone(synthetic_slides, monkeypatch):
    """A level-0 box rarely starts on a level pixel (the 5x tissue box of Table 3's slides never did);
    it is snapped to the level grid (same scale) or its fractional position goes into the BOX filter
    (resampled), so the fast reader takes it, OpenSlide is never asked, and both readers agree."""
    import openslide

    path = synthetic_slides[0][0]
    with open_slide(path) as a:
        assert a.level_count > 1
        ds = a.level_downsamples[1]
        x0, y0 = round(37 * ds) + 1, round(91 * ds) + 1  # between level-1 pixels
        bbox = (x0, y0, x0 + round(300 * ds), y0 + round(200 * ds))
        same_a, level = read_scaled(a, ds, bbox)
        scaled_a, _ = read_scaled(a, ds * 1.5, bbox)
        # the snapped read is the level's pixels from the nearest level pixel: a shift < 1 level px
        snapped = a.read_region((round(round(x0 / ds) * ds), round(round(y0 / ds) * ds)), 1, (300, 200))
    assert level == 1 and np.abs(same_a.astype(int) - snapped.astype(int)).max() <= JPEG_TOLERANCE

    def no_openslide(*args, **kwargs):
        raise AssertionError("OpenSlide read_region called for a box the tifffile reader can read")

    with open_slide(path, reader="auto") as b:
        monkeypatch.setattr(openslide.OpenSlide, "read_region", no_openslide)
        same_b, _ = read_scaled(b, ds, bbox)
        scaled_b, _ = read_scaled(b, ds * 1.5, bbox)
    assert np.abs(same_a.astype(int) - same_b.astype(int)).max() <= JPEG_TOLERANCE
    assert np.abs(scaled_a.astype(int) - scaled_b.astype(int)).max() <= JPEG_TOLERANCE
