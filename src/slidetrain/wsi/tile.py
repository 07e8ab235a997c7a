"""Tile coordinates at a target magnification, their h5 file, and reading the tiles back.

Tiles lie on one grid anchored at the slide's level-0 origin (so neighbouring
tiles of a row can be read in one call), entirely inside the slide, and are
kept when their centre is tissue *and* at least `min_tissue_fraction` of their
area is tissue. Both tests are vectorised over all grid positions at once: the
centre is a mask lookup and the fraction comes from a summed-area table of the
mask, so selection costs milliseconds even for 100k candidate tiles.

The h5 layout is CLAM's / TRIDENT's: dataset `coords` (N, 2) of level-0
top-left (x, y), with attributes patch_size (px at the target magnification),
patch_size_level0, level0_magnification, target_magnification, overlap, name,
and CLAM's patch_level / downsample / level_dim / downsampled_level_dim for the
pyramid level that holds the target scale, so either tool's users can bring
or take files. `patch_size` follows TRIDENT (px at the target magnification);
a CLAM reader (read `patch_size` px at `patch_level`) gets exactly our tile
when the pyramid has a level at the target scale, and otherwise should use
`patch_size_level0`, as TRIDENT does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from PIL import Image

from slidetrain.errors import ConfigError, NoTissueError, SlideError
from slidetrain.io import atomic_path
from slidetrain.wsi.read import level0_downsample
from slidetrain.wsi.slide import Slide

if TYPE_CHECKING:  # the mask module imports scipy (0.25 s): feature jobs only read tiles
    from slidetrain.wsi.mask import TissueMask


def patch_size_level0(slide: Slide, target_magnification: float, tile_px: int) -> int:
    """Side of a tile in level-0 px, e.g. 128 px at 5x on a 20x slide -> 512."""
    return max(1, round(tile_px * level0_downsample(slide, target_magnification)))


def _check_tiling_args(tile_px: int, overlap_px: int, min_tissue_fraction: float) -> None:
    if tile_px < 1:
        raise ConfigError(f"tile_px={tile_px} is invalid; expected an integer >= 1")
    if not 0 <= overlap_px < tile_px:
        raise ConfigError(f"overlap_px={overlap_px} is invalid; expected 0 <= overlap_px < tile_px ({tile_px})")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ConfigError(f"min_tissue_fraction={min_tissue_fraction} is invalid; expected a fraction in [0, 1]")


def tile_coordinates(
    slide: Slide,
    tissue: TissueMask,
    target_magnification: float,
    tile_px: int,
    overlap_px: int = 0,
    min_tissue_fraction: float = 0.5,
    centre_in_tissue: bool = True,
) -> np.ndarray:
    """Level-0 top-left (x, y) of the kept tiles: int64 (N, 2), row-major order.

    The stride is (tile_px - overlap_px) target px, i.e. `overlap_px` target px
    are shared by neighbours. `centre_in_tissue=False` keeps the fraction test
    alone (Big-Layers' rule: >= 60% foreground, `tissue` the greyscale
    foreground of mask.greyscale_foreground). NoTissueError if no tile qualifies.
    """
    _check_tiling_args(tile_px, overlap_px, min_tissue_fraction)
    w0, h0 = slide.dimensions
    size0 = patch_size_level0(slide, target_magnification, tile_px)
    stride0 = max(1, round((tile_px - overlap_px) * size0 / tile_px))
    xs = np.arange(0, w0 - size0 + 1, stride0, dtype=np.int64)  # (nx,)
    ys = np.arange(0, h0 - size0 + 1, stride0, dtype=np.int64)  # (ny,)
    if len(xs) == 0 or len(ys) == 0:
        raise NoTissueError(
            slide.slide_id,
            f"slide is {w0} x {h0} level-0 px, smaller than one tile of {size0} level-0 px "
            f"({tile_px} px at {target_magnification}x); expected a slide larger than a tile",
        )
    # Only grid rows/columns overlapping the tissue bounding box can qualify.
    dsx, dsy = tissue.downsample_xy
    rows = np.flatnonzero(tissue.mask.any(axis=1))
    cols = np.flatnonzero(tissue.mask.any(axis=0))
    if len(rows) == 0:
        raise NoTissueError(slide.slide_id, "tissue mask is empty; no tiles")
    bx0, bx1 = cols[0] * dsx, (cols[-1] + 1) * dsx
    by0, by1 = rows[0] * dsy, (rows[-1] + 1) * dsy
    xs = xs[(xs + size0 > bx0) & (xs < bx1)]
    ys = ys[(ys + size0 > by0) & (ys < by1)]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # (ny, nx) each
    cand = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (M, 2) x, y; row-major
    h, w = tissue.mask.shape
    cx = np.clip(((cand[:, 0] + size0 / 2) / dsx).astype(np.int64), 0, w - 1)
    cy = np.clip(((cand[:, 1] + size0 / 2) / dsy).astype(np.int64), 0, h - 1)
    keep = tissue.mask[cy, cx] if centre_in_tissue else np.ones(len(cand), bool)  # (M,) centre in tissue
    if min_tissue_fraction > 0 and keep.any():
        boxes = np.concatenate([cand[keep], cand[keep] + size0], axis=1)  # (K, 4)
        from slidetrain.wsi.mask import mask_area_fraction

        frac = mask_area_fraction(tissue, boxes)
        keep[np.flatnonzero(keep)] = frac >= min_tissue_fraction - 1e-9
    coords = cand[keep]
    if len(coords) == 0:
        centre = "has its centre in tissue and " if centre_in_tissue else "has "
        raise NoTissueError(
            slide.slide_id,
            f"no {tile_px} px tile at {target_magnification}x ({size0} level-0 px) {centre}"
            f">= {min_tissue_fraction:.0%} tissue (tissue covers {tissue.tissue_fraction:.2%} "
            "of the slide); expected tissue larger than a tile: lower min_tissue_fraction or the tile size",
        )
    return np.ascontiguousarray(coords, dtype=np.int64)


def _h5_value(value):
    """h5 attributes take numbers, strings and arrays; anything else goes in as JSON."""
    if isinstance(value, str | int | float | bool | np.generic | np.ndarray):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        return np.asarray(value)
    return json.dumps(value, default=str)


def write_tiles_h5(
    path: str | Path,
    coords: np.ndarray,
    *,
    slide: Slide,
    target_magnification: float,
    tile_px: int,
    overlap_px: int,
    extra_attrs: dict | None = None,
) -> None:
    """Write `coords` (N, 2) with CLAM/TRIDENT attributes; atomic (a killed job leaves no .h5)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    size0 = patch_size_level0(slide, target_magnification, tile_px)
    level = slide.best_level_for_downsample(size0 / tile_px)
    lds = float(slide.level_downsamples[level])
    attrs = {
        # TRIDENT
        "patch_size": int(tile_px),
        "patch_size_level0": int(size0),
        "level0_magnification": float(slide.level0_magnification),
        "target_magnification": float(target_magnification),
        "overlap": int(overlap_px),
        "name": slide.slide_id,
        # CLAM (the pyramid level holding the target scale)
        "patch_level": int(level),
        "downsample": np.asarray([lds, lds]),
        "level_dim": np.asarray(slide.level_dimensions[level], dtype=np.int64),
        "downsampled_level_dim": np.asarray(slide.level_dimensions[level], dtype=np.int64),
        # ours
        "mpp": float(slide.mpp),
        "level0_dimensions": np.asarray(slide.dimensions, dtype=np.int64),
        "n_tiles": int(len(coords)),
    }
    for key, value in (extra_attrs or {}).items():
        attrs[key] = _h5_value(value)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset(
                "coords",
                data=coords,
                maxshape=(None, 2),
                chunks=(max(1, min(len(coords), 4096)), 2),
            )
            for key, value in attrs.items():
                dset.attrs[key] = value


def read_tiles_h5(path: str | Path) -> tuple[np.ndarray, dict]:
    """coords (N, 2) int64 and the `coords` attributes as plain Python values."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise SlideError(
                    Path(path).stem,
                    f"{path} has no 'coords' dataset; expected a CLAM/TRIDENT tiles h5",
                )
            dset = f["coords"]
            coords = np.asarray(dset[:], dtype=np.int64).reshape(-1, 2)
            attrs = {}
            for key, value in dset.attrs.items():
                if isinstance(value, bytes):
                    value = value.decode()
                elif isinstance(value, np.ndarray):
                    value = value.tolist()
                elif isinstance(value, np.generic):
                    value = value.item()
                attrs[key] = value
    except OSError as err:
        raise SlideError(Path(path).stem, f"{path} is not a readable h5 file: {err}") from err
    return coords, attrs


def _runs(coords: np.ndarray, size0: int, max_run: int) -> Iterator[tuple[int, int]]:
    """[start, stop) index ranges of consecutive tiles in one row whose boxes touch or overlap."""
    n = len(coords)
    start = 0
    for i in range(1, n + 1):
        if (
            i == n
            or i - start >= max_run
            or coords[i, 1] != coords[i - 1, 1]
            or not 0 < coords[i, 0] - coords[i - 1, 0] <= size0
        ):
            yield start, i
            start = i


def read_tiles(
    slide: Slide,
    coords: np.ndarray,
    target_magnification: float,
    tile_px: int,
    max_run: int = 16,
) -> Iterator[np.ndarray]:
    """RGB uint8 (tile_px, tile_px, 3) per coordinate, in the order given.

    Reads the pyramid level at or finer than the target (never upsampling) and
    area-averages down when the level is finer. Up to `max_run` neighbours in a
    row (the usual case: coordinates come row-major) are read with one
    read_region call, which decodes each shared TIFF tile once instead of once
    per slide tile.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    size0 = patch_size_level0(slide, target_magnification, tile_px)
    level = slide.best_level_for_downsample(size0 / tile_px)
    lds = float(slide.level_downsamples[level])
    side = size0 / lds  # tile side in level px
    exact = abs(side - tile_px) < 0.5  # the level is the target scale: crop, no resampling
    for a, b in _runs(coords, size0, max_run):
        x_start, y = int(coords[a, 0]), int(coords[a, 1])
        width = math.ceil((int(coords[b - 1, 0]) - x_start + size0) / lds)
        height = tile_px if exact else math.ceil(side)
        if exact:
            width = max(width, round((int(coords[b - 1, 0]) - x_start) / lds) + tile_px)
        strip = slide.read_region((x_start, y), level, (width, height))  # (height, width, 3)
        strip_img = None if exact else Image.fromarray(strip)
        for i in range(a, b):
            off = (int(coords[i, 0]) - x_start) / lds
            if exact:
                o = round(off)
                yield np.ascontiguousarray(strip[:, o : o + tile_px])
            else:
                img = strip_img.resize((tile_px, tile_px), Image.Resampling.BOX, box=(off, 0.0, off + side, side))
                yield np.asarray(img)
