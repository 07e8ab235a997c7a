"""The whole-slide image (tissue box at a low magnification) and the mask helpers it needs.

The whole-slide image is what the locally supervised and end-to-end methods
train on: the tissue bounding box at a low magnification (5x by default),
with non-tissue made white so that background carries no signal.

Slides are read with `wsi.read.read_scaled` (shared with masking and QC); this
module depends on `wsi.mask` for the tissue mask and `wsi.mask` does not
depend on it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from slidetrain.errors import NoTissueError
from slidetrain.wsi.read import level0_downsample, read_scaled
from slidetrain.wsi.slide import Slide

__all__ = ["extract_slide_image", "level0_downsample", "mask_at", "read_scaled", "tissue_bbox"]

if TYPE_CHECKING:
    from slidetrain.wsi.mask import TissueMask


def tissue_bbox(
    tissue: TissueMask, slide_dimensions: tuple[int, int], margin_level0: int = 0
) -> tuple[int, int, int, int]:
    """Level-0 (x0, y0, x1, y1) around all tissue pixels, grown by a margin, clipped to the slide."""
    ys, xs = np.nonzero(tissue.mask.any(axis=1))[0], np.nonzero(tissue.mask.any(axis=0))[0]
    if len(xs) == 0:
        raise NoTissueError("?", "tissue mask is empty")
    dsx, dsy = tissue.downsample_xy
    w0, h0 = slide_dimensions
    x0 = max(0, math.floor(xs[0] * dsx) - margin_level0)
    y0 = max(0, math.floor(ys[0] * dsy) - margin_level0)
    x1 = min(w0, math.ceil((xs[-1] + 1) * dsx) + margin_level0)
    y1 = min(h0, math.ceil((ys[-1] + 1) * dsy) + margin_level0)
    return x0, y0, x1, y1


def mask_at(tissue: TissueMask, level0_bbox: tuple[int, int, int, int], out_size: tuple[int, int]) -> np.ndarray:
    """The tissue mask resampled (nearest) onto an output grid covering `level0_bbox`: bool (H, W)."""
    x0, y0, x1, y1 = level0_bbox
    out_w, out_h = out_size
    dsx, dsy = tissue.downsample_xy
    h, w = tissue.mask.shape
    # Centre of each output pixel in level-0 px -> mask pixel index.
    cx = x0 + (np.arange(out_w) + 0.5) * (x1 - x0) / out_w
    cy = y0 + (np.arange(out_h) + 0.5) * (y1 - y0) / out_h
    ix = np.clip((cx / dsx).astype(np.int64), 0, w - 1)
    iy = np.clip((cy / dsy).astype(np.int64), 0, h - 1)
    return np.take(np.take(tissue.mask, iy, axis=0), ix, axis=1)  # (H, W)


def extract_slide_image(
    slide: Slide, tissue: TissueMask, magnification: float = 5.0, margin_px: int = 0
) -> tuple[np.ndarray, dict]:
    """The tissue bounding box at `magnification`, background white: RGB uint8 (H, W, 3) and meta.

    `margin_px` (output pixels) widens the box so that tissue at its edge keeps
    some context. Reads the level at or finer than the target and area-averages
    down, so no pixel is ever upsampled.
    meta: level0_bbox (x0, y0, x1, y1), magnification, downsample (level-0 px per
    output px), downsample_xy, size (W, H), read_level, slide_id, mpp.
    """
    ds = level0_downsample(slide, magnification)
    try:
        bbox = tissue_bbox(tissue, slide.dimensions, margin_level0=round(margin_px * ds))
    except NoTissueError:
        raise NoTissueError(slide.slide_id, "tissue mask is empty; no slide image to extract") from None
    x0, y0, x1, y1 = bbox
    out_size = (max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds)))
    img, level = read_scaled(slide, ds, bbox, out_size)  # (H, W, 3)
    background = ~mask_at(tissue, bbox, out_size)  # (H, W)
    # White outside tissue: an in-place OR is ~10x faster than boolean indexing here.
    img |= background.view(np.uint8)[..., None] * np.uint8(255)
    meta = {
        "slide_id": slide.slide_id,
        "level0_bbox": [int(v) for v in bbox],
        "magnification": float(magnification),
        "downsample": float(ds),
        "downsample_xy": [(x1 - x0) / out_size[0], (y1 - y0) / out_size[1]],
        "size": [int(out_size[0]), int(out_size[1])],
        "read_level": int(level),
        "mpp": float(slide.mpp * ds),
    }
    return img, meta
