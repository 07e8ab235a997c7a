"""Open whole-slide images with OpenSlide and answer resolution questions.

Positions are level-0 pixels throughout; magnification comes from the
microns-per-pixel (MPP) metadata, with 10 um/px taken as 1x (so 0.5 mpp = 20x,
as Aperio and CLAM count it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide

from slidetrain.errors import SlideError
from slidetrain.wsi.tiffread import TiffLevels

#: open_slide's readers: openslide (every read through OpenSlide) | auto (tiled TIFF-family
#: files through tifffile + imagecodecs, `wsi.tiffread`; anything else through OpenSlide)
READERS = ("openslide", "auto")

MICRONS_AT_1X = 10.0  # 0.25 mpp = 40x, 0.5 mpp = 20x, 2.0 mpp = 5x


@dataclass
class Slide:
    """An open slide: OpenSlide handle plus resolution facts in named units."""

    path: Path
    slide_id: str
    handle: openslide.OpenSlide
    mpp: float  # microns per level-0 pixel
    mpp_source: str  # "metadata" or "fallback"
    tiff: TiffLevels | None = None  # the faster reader of a tiled TIFF-family file (reader="auto")

    @property
    def level0_magnification(self) -> float:
        return MICRONS_AT_1X / self.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.handle.dimensions

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.handle.level_downsamples

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.handle.level_dimensions

    def downsample_for_magnification(self, magnification: float) -> float:
        """Level-0 pixels per output pixel at `magnification`."""
        if magnification <= 0:
            raise SlideError(self.slide_id, f"target magnification must be > 0, got {magnification}")
        return self.level0_magnification / magnification

    def best_level_for_downsample(self, downsample: float) -> int:
        """The finest level whose downsample does not exceed `downsample` (so we only shrink)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def nearest_level(self, downsample: float) -> int:
        """The level whose downsample is nearest to `downsample` (log scale)."""
        ratios = [abs(np.log(ds / downsample)) for ds in self.level_downsamples]
        return int(np.argmin(ratios))

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as RGB uint8 (H, W, 3), transparent pixels made white."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (H, W, 3) of `size` pixels at `level`, top-left at level-0 `level0_xy`."""
        if self.tiff is not None:
            # Only where the level-0 position falls on a level pixel: OpenSlide resamples a
            # fractional level position (sub-pixel shift), which a tile copy cannot reproduce.
            ds = self.level_downsamples[level]
            fx, fy = (v / ds for v in level0_xy)
            if abs(fx - round(fx)) < 1e-6 and abs(fy - round(fy)) < 1e-6:
                return self.tiff.read(level, round(fx), round(fy), int(size[0]), int(size[1]))
        try:
            rgba = np.asarray(self.handle.read_region(tuple(map(int, level0_xy)), level, tuple(map(int, size))))
        except openslide.OpenSlideError as err:
            raise SlideError(self.slide_id, f"reading {size} px at level {level} of {self.path} failed: {err}") from err
        return rgba_to_rgb_on_white(rgba)

    def read_level_box(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of `level` with top-left at LEVEL pixel (x, y).

        The fast reader (reader="auto") copies the level's pixels as they are; OpenSlide gets the
        level-0 position round(x * ds), which is that level pixel whenever the level's downsample
        ds is an integer (a pyramid's non-integer downsamples, e.g. 7.998, leave OpenSlide a
        sub-pixel shift of at most 0.5 / ds level px).
        """
        if self.tiff is not None:
            return self.tiff.read(level, int(x), int(y), int(width), int(height))
        ds = self.level_downsamples[level]
        return self.read_region((round(x * ds), round(y * ds)), level, (width, height))

    def close(self) -> None:
        self.handle.close()
        if self.tiff is not None:
            self.tiff.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA onto white: no-data areas become background. (H, W, 4) -> (H, W, 3).

    openslide-python returns *non*-premultiplied RGBA (it un-premultiplies
    OpenSlide's ARGB), so partly transparent pixels are blended as
    rgb * a + 255 * (1 - a). Fully opaque regions, the usual case, are a copy.
    """
    rgba = np.asarray(rgba)
    alpha = rgba[..., 3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint32)[..., None]
    out = (rgba[..., :3].astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def read_mpp(handle: openslide.OpenSlide) -> float | None:
    """MPP from OpenSlide's standard property, else from TIFF resolution tags; None if absent."""
    props = handle.properties
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        value = props.get(key)
        if value:
            try:
                mpp = float(value)
            except ValueError:
                continue
            if mpp > 0:
                return mpp
    unit = props.get("tiff.ResolutionUnit")
    xres = props.get("tiff.XResolution")
    if unit and xres:
        try:
            res = float(xres)
        except ValueError:
            return None
        per_cm = {"centimeter": 1.0, "inch": 2.54}.get(unit)
        if per_cm and res > 0:
            return per_cm * 1e4 / res
    return None


def open_slide(
    path: str | Path,
    slide_id: str | None = None,
    mpp_fallback: float | None = None,
    reader: str = "openslide",
    threads: int = 2,
) -> Slide:
    """Open `path` with OpenSlide; raise SlideError naming the slide for anything unusable.

    `reader="auto"` reads the pixels of a tiled TIFF-family file with tifffile
    (`wsi.tiffread`, `threads` decoding threads; ~3x OpenSlide's speed on JPEG
    tiles) and of any other file with OpenSlide; metadata always comes from
    OpenSlide.

    `mpp_fallback` is used only when the file carries no MPP; without either,
    magnification is unknown and the slide cannot be tiled at a target
    magnification, so that is an error rather than a guess.
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.exists():
        raise SlideError(slide_id, f"file not found: {path}")
    if path.stat().st_size == 0:
        raise SlideError(slide_id, f"file is empty: {path}")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        kind = _sniff_tiff(path)
        if kind:  # a cut-short TIFF (directories lost) is "unsupported" to OpenSlide
            raise SlideError(
                slide_id,
                f"{path} starts like a {kind} file but OpenSlide cannot read it: truncated or corrupt, "
                f"or not a tiled pyramid (expected a complete slide file; copy it again): {err}",
            ) from err
        raise SlideError(
            slide_id,
            f"{path} is not a slide format OpenSlide can read (expected SVS, tiled TIFF, NDPI, MRXS, ...): {err}",
        ) from err
    except openslide.OpenSlideError as err:
        raise SlideError(slide_id, f"{path} could not be opened (truncated or corrupt?): {err}") from err
    mpp = read_mpp(handle)
    source = "metadata"
    if mpp is None:
        if mpp_fallback is None:
            handle.close()
            raise SlideError(
                slide_id,
                f"{path} has no microns-per-pixel metadata; set `mpp_fallback` for this dataset in the config "
                "(e.g. 0.25 for 40x, 0.5 for 20x)",
            )
        mpp, source = float(mpp_fallback), "fallback"
    if reader not in READERS:
        handle.close()
        raise SlideError(slide_id, f"reader: expected one of {list(READERS)}, got {reader!r}")
    slide = Slide(path=path, slide_id=slide_id, handle=handle, mpp=mpp, mpp_source=source)
    _check_readable(slide)
    if reader == "auto":
        slide.tiff = TiffLevels.open(path, handle.level_dimensions, threads)
    return slide


def _sniff_tiff(path: Path) -> str | None:
    """'TIFF' or 'BigTIFF' if the file has a TIFF header (SVS, NDPI, generic TIFF), else None."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF", b"MM\x00+": "BigTIFF"}.get(magic)


def _check_readable(slide: Slide) -> None:
    """Decode the smallest level once: truncated files fail here with a clear message, not mid-run."""
    level = slide.level_count - 1
    w, h = slide.level_dimensions[level]
    try:
        # A corner of the smallest level: cheap even on single-level slides, and a file cut short
        # usually loses its last (smallest) pages first.
        slide.handle.read_region((0, 0), level, (min(w, 1024), min(h, 1024)))
    except openslide.OpenSlideError as err:
        slide.close()
        raise SlideError(
            slide.slide_id, f"{slide.path} is truncated or corrupt: decoding level {level} failed: {err}"
        ) from err
