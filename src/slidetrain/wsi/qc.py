"""QC picture of one slide: thumbnail, tissue outline, kept tiles.

One glance shows the usual masking failures (pen taken as tissue, faint tissue
lost, debris kept) and whether tiles cover the tissue, so it is written for
every slide next to the mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from slidetrain.io import atomic_path
from slidetrain.wsi.image import mask_at
from slidetrain.wsi.mask import TissueMask
from slidetrain.wsi.read import read_scaled
from slidetrain.wsi.slide import Slide

OUTLINE_RGB = (0, 190, 0)  # tissue outline
TILE_RGBA = (30, 80, 255, 170)  # kept tile boxes
BANNER_PX = 18


def qc_picture(
    path: str | Path,
    slide: Slide,
    tissue: TissueMask,
    coords: np.ndarray,
    tile_size_level0: int,
    title: str = "",
    max_side_px: int = 1024,  # 1024 lets typical slides read the 4x-down level instead of 2x: 4x less decoding
) -> None:
    """Write the QC picture (PNG, or JPEG for .jpg/.jpeg) atomically."""
    w0, h0 = slide.dimensions
    ds = max(1.0, max(w0, h0) / max_side_px)
    thumb, _ = read_scaled(slide, ds)  # (th, tw, 3)
    th, tw = thumb.shape[:2]
    sx, sy = w0 / tw, h0 / th  # level-0 px per thumbnail px

    m = mask_at(tissue, (0, 0, w0, h0), (tw, th))  # (th, tw)
    edge = m & ~ndi.binary_erosion(m, border_value=0)
    edge = ndi.binary_dilation(edge, iterations=1 if max(tw, th) >= 800 else 0) if edge.any() else edge
    thumb = thumb.copy()
    thumb[edge] = OUTLINE_RGB

    img = Image.fromarray(thumb).convert("RGBA")
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    boxes = np.concatenate([coords, coords + tile_size_level0], axis=1) / np.array([sx, sy, sx, sy])
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=TILE_RGBA)
    img = Image.alpha_composite(img, overlay).convert("RGB")

    caption = f"{title}  " if title else ""
    caption += f"{slide.slide_id}: {w0}x{h0} px, {len(coords)} tiles, tissue {tissue.tissue_fraction:.1%}"
    canvas = Image.new("RGB", (tw, th + BANNER_PX), (255, 255, 255))
    canvas.paste(img, (0, BANNER_PX))
    ImageDraw.Draw(canvas).text((3, 3), caption, fill=(0, 0, 0), font=ImageFont.load_default())

    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        # PNG at zlib level 1: a photo-like thumbnail barely shrinks further but encodes ~5x slower.
        options = {"quality": 90} if fmt == "JPEG" else {"compress_level": 1}
        canvas.save(tmp, format=fmt, **options)
