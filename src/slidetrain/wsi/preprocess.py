"""Per-slide preprocessing in one call: mask, tiles, QC picture, whole-slide image, timings.

One Snakemake job per slide runs this. The slide is opened once, every result
is computed before anything is written (a slide that fails, e.g. with no
tissue, leaves no partial outputs), and each file is written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path, write_json
from slidetrain.wsi.image import extract_slide_image
from slidetrain.wsi.mask import (
    GREY_RANGE_DEFAULT,
    TissueMask,
    greyscale_foreground,
    mask_params,
    segment_tissue,
    write_mask_png,
)
from slidetrain.wsi.qc import qc_picture
from slidetrain.wsi.slide import Slide, open_slide
from slidetrain.wsi.tile import patch_size_level0, tile_coordinates, write_tiles_h5

TILE_FOREGROUNDS = ("mask", "greyscale")


def _kept_tile_coordinates(
    slide: Slide,
    tissue: TissueMask,
    target_magnification: float,
    tile_px: int,
    overlap_px: int,
    min_tissue_fraction: float,
    tile_foreground: str,
    foreground_grey_range: tuple[int, int],
) -> np.ndarray:
    """Tile positions (N, 2) kept by `tile_foreground`: the tissue mask (with the centre in tissue), or
    the share of greyscale foreground pixels alone (Big-Layers)."""
    if tile_foreground == "greyscale":
        size0 = patch_size_level0(slide, target_magnification, tile_px)
        foreground = greyscale_foreground(slide, size0, tuple(foreground_grey_range))
        return tile_coordinates(
            slide, foreground, target_magnification, tile_px, overlap_px, min_tissue_fraction, centre_in_tissue=False
        )
    return tile_coordinates(slide, tissue, target_magnification, tile_px, overlap_px, min_tissue_fraction)


def _slide_summary(slide: Slide, tissue: TissueMask, coords: np.ndarray, size0: int, meta: dict) -> dict:
    """What preprocessing found on a slide (size, MPP, mask, tiles, image), beside its timings."""
    w0, h0 = slide.dimensions
    return {
        "n_tiles": int(len(coords)),
        "slide_w": int(w0),
        "slide_h": int(h0),
        "mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "mask_level": int(tissue.level),
        "mask_downsample": float(tissue.downsample),
        "tissue_fraction": tissue.tissue_fraction,
        "patch_size_level0": int(size0),
        "image_w": int(meta["size"][0]),
        "image_h": int(meta["size"][1]),
    }


def preprocess_slide(
    slide_path: str | Path,
    slide_id: str,
    *,
    mask_png: str | Path,
    qc_path: str | Path,
    tiles_h5: str | Path,
    image_path: str | Path,
    image_meta_json: str | Path,
    timings_json: str | Path,
    mask_preset: str = "default",
    mask_overrides: dict | None = None,
    target_magnification: float = 20.0,
    tile_px: int = 256,
    overlap_px: int = 0,
    min_tissue_fraction: float = 0.5,
    image_magnification: float = 5.0,
    mpp_fallback: float | None = None,
    tile_foreground: str = "mask",
    foreground_grey_range: tuple[int, int] = GREY_RANGE_DEFAULT,
) -> dict:
    """Mask, tile and extract one slide; return (and write) the per-stage timings.

    `tile_foreground`: what min_tissue_fraction counts: "mask" (the tissue mask; a tile's centre
    must be tissue too) or "greyscale" (Big-Layers: pixels of greyscale intensity in
    `foreground_grey_range`, the fraction alone). The tissue mask still gives the QC picture and the
    whole-slide image. Raises SlideError / NoTissueError (naming the slide) before writing anything.
    """
    if tile_foreground not in TILE_FOREGROUNDS:
        raise ConfigError(f"tile_foreground={tile_foreground!r} is invalid; expected one of {list(TILE_FOREGROUNDS)}")
    params = mask_params(mask_preset, mask_overrides)  # bad config fails before the slide is read
    t0 = time.perf_counter()
    with open_slide(slide_path, slide_id=slide_id, mpp_fallback=mpp_fallback) as slide:
        t_open = time.perf_counter()
        tissue = segment_tissue(slide, params)
        t_mask = time.perf_counter()
        coords = _kept_tile_coordinates(
            slide,
            tissue,
            target_magnification,
            tile_px,
            overlap_px,
            min_tissue_fraction,
            tile_foreground,
            foreground_grey_range,
        )
        t_tile = time.perf_counter()
        image, meta = extract_slide_image(slide, tissue, image_magnification)  # (H, W, 3)
        t_image = time.perf_counter()

        write_mask_png(mask_png, tissue)
        write_tiles_h5(
            tiles_h5,
            coords,
            slide=slide,
            target_magnification=target_magnification,
            tile_px=tile_px,
            overlap_px=overlap_px,
            extra_attrs={
                "min_tissue_fraction": float(min_tissue_fraction),
                "mask_preset": mask_preset,
                "mask_downsample": float(tissue.downsample),
                "tile_foreground": tile_foreground,
                **(
                    {"foreground_grey_range": list(map(int, foreground_grey_range))}
                    if tile_foreground == "greyscale"
                    else {}
                ),
            },
        )
        size0 = patch_size_level0(slide, target_magnification, tile_px)
        with atomic_path(image_path) as tmp:
            Image.fromarray(image).save(tmp, format="JPEG", quality=95)
        write_json(image_meta_json, meta)
        t_write = time.perf_counter()
        qc_picture(qc_path, slide, tissue, coords, size0, title=f"{mask_preset} mask")
        t_qc = time.perf_counter()
        timings = {
            "slide_id": slide.slide_id,
            "open_s": t_open - t0,
            "mask_s": t_mask - t_open,
            "tile_s": t_tile - t_mask,
            "image_s": t_image - t_tile,
            "write_s": t_write - t_image,
            "qc_s": t_qc - t_write,
            "total_s": t_qc - t0,
            **_slide_summary(slide, tissue, coords, size0, meta),
        }
    write_json(timings_json, timings)
    return timings
