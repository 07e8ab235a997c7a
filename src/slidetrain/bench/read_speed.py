"""Reading the whole-slide image (the 5x tissue box) through OpenSlide and through tifffile, side by side.

    slidetrain bench-read --slides a.tiff b.svs --threads 2 --repeats 3 --out read_speed.csv

Per slide: open it, mask the tissue once (untimed), then read the tissue box
at 5x (`wsi.image.extract_slide_image`, what training and Table 3 see) with
each reader in turn, `repeats` times after one untimed warm-up read (the OS
file cache, so every reader reads warm):
- `openslide`: OpenSlide `read_region`, one thread (what the pipeline's OpenSlide path does);
- `openslide_threads`: OpenSlide with `threads` threads, each box read as row strips in parallel
  (`read_region` releases the GIL), so that tifffile is also compared with OpenSlide given
  equal resources;
- `auto`: `wsi.tiffread` with `threads` decoding threads for tiled TIFF-family files, OpenSlide
  (one thread) otherwise.
The images must equal OpenSlide's within `max_abs_diff` grey levels (JPEG
decoders may differ by a level or two); a larger difference is an error, not a row.

Rows: slide, image_size ("WxH" at 5x), reader, backend (what read the pixels),
threads (the reader's threads), seconds (mean per read), mpx_per_s (5x pixels
per second), speedup (over one-thread openslide on the same slide),
speedup_equal_threads (over OpenSlide with the row's thread count), max_abs_diff.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.errors import SlidetrainError
from slidetrain.io import atomic_path
from slidetrain.wsi.image import extract_slide_image
from slidetrain.wsi.mask import mask_params, segment_tissue
from slidetrain.wsi.slide import Slide, open_slide

log = logging.getLogger(__name__)

READ_COLUMNS = [
    "slide",
    "image_size",
    "reader",
    "backend",
    "threads",
    "seconds",
    "mpx_per_s",
    "speedup",
    "speedup_equal_threads",
    "max_abs_diff",
]
#: JPEG decoders may round differently; more than this is a wrong read
JPEG_TOLERANCE = 4


@dataclasses.dataclass
class ThreadedOpenSlide(Slide):
    """A slide read through OpenSlide by `threads` threads: each box as row strips read in parallel.

    The benchmark's equal-resources OpenSlide (the pipeline reads with one thread). OpenSlide's
    read_region is thread-safe on one handle and openslide-python's ctypes call releases the GIL.
    """

    threads: int = 1

    @classmethod
    def open(cls, path: str | Path, threads: int, mpp_fallback: float | None = None) -> ThreadedOpenSlide:
        slide = open_slide(path, mpp_fallback=mpp_fallback, reader="openslide")
        return cls(**{f.name: getattr(slide, f.name) for f in dataclasses.fields(Slide)}, threads=threads)

    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        width, height = map(int, size)
        n = max(1, min(self.threads, height))
        if n == 1:
            return super().read_region(level0_xy, level, size)
        ds = self.level_downsamples[level]
        x, y = map(int, level0_xy)
        cuts = [round(height * i / n) for i in range(n + 1)]  # level rows of each strip

        def strip(i: int) -> np.ndarray:  # (h_i, W, 3)
            return Slide.read_region(self, (x, y + round(cuts[i] * ds)), level, (width, cuts[i + 1] - cuts[i]))

        with ThreadPoolExecutor(n) as pool:
            return np.concatenate(list(pool.map(strip, range(n))))  # (H, W, 3)


def _open_reader(reader: str, slide_path: str | Path, threads: int, mpp_fallback: float | None) -> Slide:
    if reader == "openslide_threads":
        return ThreadedOpenSlide.open(slide_path, threads, mpp_fallback)
    return open_slide(slide_path, mpp_fallback=mpp_fallback, reader=reader, threads=threads)


#: reader -> its thread count, given the benchmark's `threads`
BENCH_READERS = {
    "openslide": lambda threads: 1,
    "openslide_threads": lambda threads: threads,
    "auto": lambda threads: threads,
}


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
    for reader, reader_threads in BENCH_READERS.items():
        with _open_reader(reader, slide_path, reader_threads(threads), mpp_fallback) as slide:
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
                # auto falls back to one-thread OpenSlide for files tifffile does not read
                "threads": reader_threads(threads) if reader != "auto" or backend == "tifffile" else 1,
                "seconds": mean,
                "mpx_per_s": image.shape[0] * image.shape[1] / 1e6 / mean,
            }
        )
    reference = images["openslide"].astype(np.int16)
    diffs = {reader: int(np.abs(reference - image.astype(np.int16)).max()) for reader, image in images.items()}
    for reader, diff in diffs.items():
        if diff > JPEG_TOLERANCE:
            raise SlidetrainError(
                f"bench-read: {slide_path}: reader {reader} differs from OpenSlide by {diff} grey levels "
                f"(expected <= {JPEG_TOLERANCE}, JPEG decoder rounding)"
            )
    base = rows[0]["seconds"]
    openslide_s = {row["threads"]: row["seconds"] for row in rows if row["reader"].startswith("openslide")}
    for row in rows:
        row.update(
            speedup=base / row["seconds"],
            max_abs_diff=diffs[row["reader"]],
            speedup_equal_threads=openslide_s.get(row["threads"], np.nan) / row["seconds"],
        )
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
            path,
            magnification=magnification,
            threads=threads,
            repeats=repeats,
            mpp_fallback=mpp_fallback,
        )
    ]
    table = pd.DataFrame(rows, columns=READ_COLUMNS)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    return table


__all__ = ["BENCH_READERS", "READ_COLUMNS", "ThreadedOpenSlide", "bench_read", "time_reads"]
