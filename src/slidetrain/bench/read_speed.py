"""Reading the whole-slide image (the 5x tissue box) through OpenSlide and through tifffile, side by side.

    slidetrain bench-read --slides a.tiff b.svs --threads 2 --repeats 3 --out read_speed.csv

Per slide: open it, mask the tissue once (untimed), then read the tissue box
at 5x (`wsi.image.extract_slide_image`, what training and Table 3 see) with
each reader in turn, `repeats` times after one untimed warm-up read (the OS
file cache): `openslide` (OpenSlide `read_region`) and `auto` (`wsi.tiffread`
for tiled TIFF-family files, OpenSlide otherwise). The two images must be
equal within `max_abs_diff` grey levels (JPEG decoders may differ by a level
or two); a larger difference is an error, not a row.

Rows: slide, image_size ("WxH" at 5x), reader, backend (what read the pixels),
seconds (mean per read), mpx_per_s (5x pixels per second), speedup (over
openslide on the same slide), max_abs_diff.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.errors import SlidetrainError
from slidetrain.io import atomic_path
from slidetrain.wsi.image import extract_slide_image
from slidetrain.wsi.mask import mask_params, segment_tissue
from slidetrain.wsi.slide import READERS, open_slide

log = logging.getLogger(__name__)

READ_COLUMNS = ["slide", "image_size", "reader", "backend", "seconds", "mpx_per_s", "speedup", "max_abs_diff"]
#: JPEG decoders may round differently; more than this is a wrong read
JPEG_TOLERANCE = 4


def time_reads(
    slide_path: str | Path,
    *,
    magnification: float = 5.0,
    threads: int = 2,
    repeats: int = 3,
    mask_preset: str = "default",
    mpp_fallback: float | None = None,
) -> list[dict]:
    """Rows of one slide: each reader's seconds and Mpx/s for the tissue box at `magnification`."""
    with open_slide(slide_path, mpp_fallback=mpp_fallback) as slide:
        tissue = segment_tissue(slide, mask_params(mask_preset))
    images, rows = {}, []
    for reader in READERS:
        with open_slide(slide_path, mpp_fallback=mpp_fallback, reader=reader, threads=threads) as slide:
            extract_slide_image(slide, tissue, magnification)  # warm-up: file cache, decoder tables
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                image, meta = extract_slide_image(slide, tissue, magnification)  # (H, W, 3)
                seconds.append(time.perf_counter() - t0)
            backend = "tifffile" if slide.tiff is not None else "openslide"
        images[reader] = image
        mean = float(np.mean(seconds))
        rows.append(
            {
                "slide": Path(slide_path).name,
                "image_size": f"{meta['size'][0]}x{meta['size'][1]}",
                "reader": reader,
                "backend": backend,
                "seconds": mean,
                "mpx_per_s": image.shape[0] * image.shape[1] / 1e6 / mean,
            }
        )
    diff = int(np.abs(images["openslide"].astype(np.int16) - images["auto"].astype(np.int16)).max())
    if diff > JPEG_TOLERANCE:
        raise SlidetrainError(
            f"bench-read: {slide_path}: the readers differ by {diff} grey levels "
            f"(expected <= {JPEG_TOLERANCE}, JPEG decoder rounding)"
        )
    base = rows[0]["seconds"]
    for row in rows:
        row.update(speedup=base / row["seconds"], max_abs_diff=diff)
    log.info("%s: %s", Path(slide_path).name, rows)
    return rows


def bench_read(
    slide_paths: list[str | Path],
    out_csv: str | Path,
    *,
    threads: int = 2,
    repeats: int = 3,
    magnification: float = 5.0,
    mpp_fallback: float | None = None,
) -> pd.DataFrame:
    """`slidetrain bench-read`: rows for every slide, written as CSV."""
    rows = [
        row
        for path in slide_paths
        for row in time_reads(
            path, magnification=magnification, threads=threads, repeats=repeats,
            mpp_fallback=mpp_fallback,
        )
    ]
    table = pd.DataFrame(rows, columns=READ_COLUMNS)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    return table


__all__ = ["READ_COLUMNS", "bench_read", "time_reads"]
