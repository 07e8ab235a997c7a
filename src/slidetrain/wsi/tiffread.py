"""Read boxes of a tiled TIFF-family slide (generic tiled TIFF, Aperio SVS) with tifffile + imagecodecs.

OpenSlide's `read_region` paints every tile into an ARGB buffer, un-premultiplies
it and hands Python a PIL image: about 10 Mpx/s on this project's CPU for a
5x tissue box. Here the tiles that cover the box are read as compressed bytes
(one pass over the file), decoded by imagecodecs (libjpeg-turbo for JPEG) on
a few threads and copied into the RGB output: the same pixels within JPEG
decoder tolerance (tests/test_tiffread.py compares both on the synthetic TIFF
and on the Aperio fixture).

Only what can be mapped one to one is taken: the file's first (baseline)
series, whose pyramid levels have OpenSlide's level dimensions, each a
tiled, contiguous 8-bit RGB page. Anything else (NDPI, MRXS, strips, other
layouts, a level that fails to map) is left to OpenSlide: `TiffLevels.open`
returns None and the caller keeps using it.

Level coordinates: `Slide.read_region` takes this path only when the level-0
position maps onto a whole level pixel (x / ds integral, ds = OpenSlide's level
downsample); OpenSlide resamples a fractional level position by a sub-pixel
shift, so such reads stay with OpenSlide.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

#: compression schemes decoded here (none, LZW, JPEG, deflate, Adobe deflate, JPEG 2000 (Aperio))
SUPPORTED_COMPRESSION = {1, 5, 7, 8, 32946, 33003, 33005, 34712}


class TiffLevels:
    """The pyramid pages of one TIFF-family slide, read box by box; `open` returns None if unsupported."""

    def __init__(self, tif: tifffile.TiffFile, pages: list[tifffile.TiffPage], threads: int = 2):
        self.tif = tif
        self.pages = pages  # one per OpenSlide level, finest first
        self.threads = max(1, int(threads))
        self._lock = threading.Lock()  # one file handle: reads are serialised, decoding is not

    @classmethod
    def open(
        cls, path: str | Path, level_dimensions: tuple[tuple[int, int], ...], threads: int = 2
    ) -> TiffLevels | None:
        """Map OpenSlide's levels ((w, h) each) onto the file's pages, or None when one does not map."""
        try:
            tif = tifffile.TiffFile(str(path))
        except (OSError, ValueError, tifffile.TiffFileError):
            return None
        try:
            pages = _level_pages(tif, level_dimensions)
        except (ValueError, IndexError, KeyError, tifffile.TiffFileError):
            pages = None
        if pages is None:
            tif.close()
            return None
        return cls(tif, pages, threads)

    def close(self) -> None:
        self.tif.close()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of `level` with top-left at level pixel (x, y); white outside it."""
        page = self.pages[level]
        page_h, page_w = page.shape[:2]
        out = np.full((height, width, 3), 255, dtype=np.uint8)  # OpenSlide: transparent -> white
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, page_w), min(y + height, page_h)
        if x1 <= x0 or y1 <= y0:
            return out
        th, tw = page.tilelength, page.tilewidth
        across = math.ceil(page_w / tw)
        tiles = [(r, c) for r in range(y0 // th, (y1 - 1) // th + 1) for c in range(x0 // tw, (x1 - 1) // tw + 1)]
        offsets, counts = page.dataoffsets, page.databytecounts
        fh = self.tif.filehandle
        with self._lock:  # compressed bytes of every tile in the box, in file order
            encoded = []
            for r, c in tiles:
                index = r * across + c
                if counts[index] == 0:
                    encoded.append((index, None))
                    continue
                fh.seek(offsets[index])
                encoded.append((index, fh.read(counts[index])))
        decode = page.decode  # tifffile's decoder of this page (JPEG tables, colour space)

        def paste(item: tuple[int, bytes | None]) -> None:
            index, data = item
            r, c = divmod(index, across)
            if data is None:  # an empty tile: OpenSlide shows it as background
                return
            segment, _, _ = decode(data, index, jpegtables=page.jpegtables)
            tile = np.asarray(segment).reshape(th, tw, -1)[..., :3]  # (th, tw, 3)
            ty0, tx0 = r * th, c * tw
            ay0, ay1 = max(y0, ty0), min(y1, ty0 + th)
            ax0, ax1 = max(x0, tx0), min(x1, tx0 + tw)
            out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[ay0 - ty0 : ay1 - ty0, ax0 - tx0 : ax1 - tx0]

        if self.threads > 1 and len(encoded) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(paste, encoded))
        else:
            for item in encoded:
                paste(item)
        return out


def _level_pages(
    tif: tifffile.TiffFile, level_dimensions: tuple[tuple[int, int], ...]
) -> list[tifffile.TiffPage] | None:
    """The baseline series' level pages in OpenSlide's level order, or None when they do not match."""
    if not tif.series:
        return None
    levels = tif.series[0].levels
    if len(levels) != len(level_dimensions):
        return None
    pages = []
    for series_level, (w, h) in zip(levels, level_dimensions, strict=True):
        if len(series_level.pages) != 1:
            return None
        page = series_level.pages[0]
        ok = (
            isinstance(page, tifffile.TiffPage)
            and page.is_tiled
            and page.shape[:2] == (h, w)
            and page.samplesperpixel in (3, 4)
            and page.planarconfig == 1  # contiguous RGB(A)
            and page.dtype == np.uint8
            and page.imagedepth == 1
            and int(page.compression) in SUPPORTED_COMPRESSION
        )
        if not ok:
            return None
        pages.append(page)
    return pages
