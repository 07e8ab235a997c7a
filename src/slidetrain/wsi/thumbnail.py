"""A slide's thumbnail with memory bounded by the thumbnail, not the slide, and level-0 grids put on it.

Why strips: OpenSlide's get_thumbnail reads the whole level nearest the wanted size in one
region, which on a slide whose pyramid stops early (or has no pyramid) is the whole slide.
Here the level at or just above the thumbnail size is read in horizontal strips, each
area-averaged by an integer factor, so at most one strip and the thumbnail are in memory.

    from slidetrain.wsi.thumbnail import read_thumbnail
    thumb = read_thumbnail("slide.tiff", "slide_01", max_px=1024)
    thumb.rgb.shape, thumb.downsample_xy   # (h, w, 3), level-0 px per thumbnail px
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from slidetrain.errors import SlideError
from slidetrain.wsi.slide import open_slide

#: level pixels read per strip, at most (~12 MB of RGB); bounds the reader's memory
STRIP_PX = 4 * 1024 * 1024


@dataclass(frozen=True)
class Thumbnail:
    rgb: np.ndarray  # (h, w, 3) uint8
    downsample_xy: tuple[float, float]  # level-0 px per thumbnail px, x and y
    level0_dimensions: tuple[int, int]  # (width, height) of the slide
    level: int  # pyramid level the thumbnail was reduced from


def thumbnail_level(level_dimensions: tuple[tuple[int, int], ...], max_px: int) -> int:
    """The level to reduce by an integer factor: the one giving the largest thumbnail (long side <= max_px)
    among levels at most 8x the thumbnail's side (read cost), the coarsest on a tie; with no such level the
    coarsest level still >= max_px (level 0 when the slide is smaller)."""
    coarsest = 0
    for level, (w, h) in enumerate(level_dimensions):
        if max(w, h) >= max_px:
            coarsest = level
    best, best_side = coarsest, -1
    for level, (w, h) in enumerate(level_dimensions):
        long_side = max(w, h)
        if max_px <= long_side <= 8 * max_px:
            side = math.ceil(long_side / math.ceil(long_side / max_px))
            if side >= best_side:
                best, best_side = level, side
    return best


def read_thumbnail(
    slide_path: str | Path, slide_id: str, max_px: int = 1024, mpp_fallback: float | None = None
) -> Thumbnail:
    """The slide reduced so that its long side is at most `max_px`, read strip by strip."""
    if max_px < 16:
        raise SlideError(slide_id, f"thumbnail max_px must be >= 16, got {max_px}")
    with open_slide(slide_path, slide_id=slide_id, mpp_fallback=mpp_fallback, reader="auto") as slide:
        level = thumbnail_level(slide.level_dimensions, max_px)
        lw, lh = slide.level_dimensions[level]
        factor = max(1, math.ceil(max(lw, lh) / max_px))  # integer, so strips reduce without seams
        tw, th = math.ceil(lw / factor), math.ceil(lh / factor)
        thumb = np.empty((th, tw, 3), np.uint8)
        # rows per strip: a multiple of the factor, so each strip maps onto whole thumbnail rows
        rows = max(factor, (STRIP_PX // max(lw, 1)) // factor * factor)
        for y in range(0, lh, rows):
            height = min(rows, lh - y)
            strip = slide.read_level_box(level, 0, y, lw, height)  # (height, lw, 3)
            small = np.asarray(Image.fromarray(strip).reduce(factor))  # (ceil(height / f), tw, 3)
            thumb[y // factor : y // factor + small.shape[0]] = small
        w0, h0 = slide.dimensions
        ds = float(slide.level_downsamples[level]) * factor
    return Thumbnail(thumb, (ds, ds), (int(w0), int(h0)), level)


def grid_on_thumbnail(grid: np.ndarray, grid_downsample_xy: tuple[float, float], thumb: Thumbnail) -> np.ndarray:
    """A boolean level-0 grid (mask px (i, j) covers level-0 [j * dsx, (j+1) * dsx) x ...) on the thumbnail's
    pixels (nearest neighbour): (h, w) bool, False where the grid does not reach."""
    th, tw = thumb.rgb.shape[:2]
    gdx, gdy = grid_downsample_xy
    tdx, tdy = thumb.downsample_xy
    # the level-0 centre of each thumbnail pixel, as a grid index
    cols = np.floor(((np.arange(tw) + 0.5) * tdx) / gdx).astype(np.int64)  # (w,)
    rows = np.floor(((np.arange(th) + 0.5) * tdy) / gdy).astype(np.int64)  # (h,)
    inside_c = cols < grid.shape[1]
    inside_r = rows < grid.shape[0]
    out = np.zeros((th, tw), bool)
    out[np.ix_(inside_r, inside_c)] = grid.astype(bool)[np.ix_(rows[inside_r], cols[inside_c])]
    return out
