"""Read a slide (or a level-0 box of it) at an arbitrary downsample: what masking, QC and the slide image share.

Reading rule: read the finest pyramid level at or below the wanted downsample
(never upsample) and shrink with area averaging (PIL's BOX filter, which takes
a fractional source box, so pyramid levels whose downsample is not an integer
map exactly). Reads are in the read level's own pixel grid (`Slide.read_level_box`), so the
tifffile reader copies whole level pixels and never falls back to OpenSlide's sub-pixel rendering:
where the level already has the wanted scale the box is snapped to that grid (its top-left moves
to the nearest level pixel: at most half a level pixel, e.g. 2 level-0 px for a 5x box read from
the 4x-downsampled level of a 20x slide); a resampled read takes the box's fractional position
in the BOX filter instead, so it is not shifted at all. Large outputs are produced in horizontal bands so memory stays
bounded by one band of the read level, not the whole level.

This module sits below both `mask` and `image` (which needs the mask), so
neither imports the other in a circle.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from slidetrain.errors import SlideError
from slidetrain.wsi.slide import Slide

BAND_LEVEL_PIXELS = 16_000_000  # max pixels of the read level held at once (~48 MB RGB)


SNAP_TOLERANCE = 0.02  # level-0/target ratios within 2 % of an integer are that integer


def level0_downsample(slide: Slide, magnification: float) -> float:
    """Level-0 px per output px at `magnification`; SlideError if that would upsample.

    Scanners write mpp like 0.499 or 0.2527, so the exact ratio to 20x is
    1.002 or 1.979; taken literally every tile would be resampled by 0.2 %. A
    ratio within 2 % of an integer is snapped to it, which is what the
    objective-power-based magnifications of CLAM and TRIDENT amount to.
    """
    ds = slide.downsample_for_magnification(magnification)
    nearest = round(ds)
    if nearest >= 1 and abs(ds - nearest) <= SNAP_TOLERANCE * ds:
        ds = float(nearest)
    if ds < 1.0:
        raise SlideError(
            slide.slide_id,
            f"magnification {magnification}x is above the slide's scan magnification "
            f"{slide.level0_magnification:.2f}x (mpp {slide.mpp}); expected <= "
            f"{slide.level0_magnification:.2f}x, as we never upsample",
        )
    return ds


def read_scaled(
    slide: Slide,
    downsample: float,
    level0_bbox: tuple[int, int, int, int] | None = None,
    out_size: tuple[int, int] | None = None,
    level: int | None = None,
) -> tuple[np.ndarray, int]:
    """RGB uint8 (H, W, 3) of `level0_bbox` (x0, y0, x1, y1; default: whole slide) at `downsample`.

    `out_size` (W, H) defaults to the box size / downsample, rounded, at least 1.
    `level` overrides the level read (it must be at or finer than `downsample`).
    Returns the image and the pyramid level read.
    """
    w0, h0 = slide.dimensions
    x0, y0, x1, y1 = level0_bbox if level0_bbox is not None else (0, 0, w0, h0)
    if x1 <= x0 or y1 <= y0:
        raise SlideError(slide.slide_id, f"empty level-0 box {(x0, y0, x1, y1)} requested")
    if out_size is None:
        out_size = (max(1, round((x1 - x0) / downsample)), max(1, round((y1 - y0) / downsample)))
    out_w, out_h = map(int, out_size)
    if level is None:
        level = slide.best_level_for_downsample(downsample)
    lds = float(slide.level_downsamples[level])
    lx0, ly0, lx1, ly1 = x0 / lds, y0 / lds, x1 / lds, y1 / lds  # the box in level px (fractional)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)  # (H, W, 3)
    if abs(out_w * lds - (x1 - x0)) <= lds and abs(out_h * lds - (y1 - y0)) <= lds:
        # The level already has the wanted scale (drift <= 1 level px across the box,
        # i.e. pyramid rounding only): copy its pixels, in bands, from the level pixel nearest
        # the box's corner (the snap: <= half a level pixel).
        gx, gy = round(lx0), round(ly0)
        rows_per_band = max(1, BAND_LEVEL_PIXELS // out_w)
        for r0 in range(0, out_h, rows_per_band):
            r1 = min(out_h, r0 + rows_per_band)
            out[r0:r1] = slide.read_level_box(level, gx, gy + r0, out_w, r1 - r0)
        return out, level
    rx0 = math.floor(lx0)
    read_w = max(1, math.ceil(lx1) - rx0)
    sy = (ly1 - ly0) / out_h  # level px per output row
    rows_per_band = max(1, int(BAND_LEVEL_PIXELS / read_w / sy))
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        # Level span of output rows r0..r1, and the whole level pixels that cover it.
        by0 = ly0 + r0 * sy
        by1 = ly0 + r1 * sy
        ry0 = math.floor(by0)
        read_h = max(1, math.ceil(by1) - ry0)
        region = slide.read_level_box(level, rx0, ry0, read_w, read_h)  # (read_h, read_w, 3)
        box = (lx0 - rx0, by0 - ry0, lx1 - rx0, by1 - ry0)
        img = Image.fromarray(region).resize((out_w, r1 - r0), Image.Resampling.BOX, box=box)
        out[r0:r1] = np.asarray(img)
    return out, level
