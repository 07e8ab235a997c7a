"""Deterministic synthetic H&E-like whole-slide images that OpenSlide opens.

Why: the default pipeline must run end to end with no downloads, so it draws
its own dataset. The slides imitate what the real pipeline has to cope with
(near-white background, a few irregular tissue pieces, pen marks, debris,
stain variation) and carry a learnable slide label: an ordinal grade shown by
local lesions that cover a minority of the tissue, so a slide classifier has
to find them (multiple-instance setting) rather than read a global colour.
How hard that is, is a Difficulty (DIFFICULTY_PRESETS, per dataset in the
config): `classic` draws dark, dense lesions that colour alone gives away; the
graded presets draw smaller lesions whose nuclei are stained like normal ones
and differ in size, outline and density, with stain shifts between simulated
sites, as real atypia does.

How (and why it is fast): everything macroscopic (tissue pieces, lesions, pen,
stain variation) is drawn as small masks on a grid at downsample 16 (which
doubles as the ground truth). Texture (stroma fibres, nuclei) is drawn at 5x
(downsample 4, 2 um/px), the magnification the pipeline classifies at, in
horizontal strips whose random numbers come from fixed row blocks, so the
result does not depend on strip size and memory stays bounded. Colour comes
from a Beer-Lambert stain model (optical density = hematoxylin + eosin + ink),
which gives H&E hues for free. Nuclei are soft-edged blobs 2-4 px across at
5x, so levels 0 (20x) and 1 (10x), bilinear upsamplings of the 5x canvas
written tile row by tile row (plus fine grain at 20x), look like slightly
soft tissue, not blocks. A 40,960 x 30,720 slide needs only the 5x canvas
(~300 MB) in memory (measured peak RSS ~0.7 GB, ~45 s of one core).

File layout: a tiled (256 px) JPEG TIFF with one page per level (downsample 2
per level, not SubIFDs, so OpenSlide's generic-tiff driver sees the pyramid)
and resolution tags in centimetres, which OpenSlide turns into
`openslide.mpp-x` / `openslide.mpp-y` (0.5 um/px = 20x at level 0).

    from slidetrain.wsi.synthetic import synthetic_sheet, synthetic_spec, write_synthetic_slide
    sheet = synthetic_sheet(150, seed=0)
    row = sheet.iloc[0]
    spec = synthetic_spec(row.slide_id, row.label, seed=0)
    write_synthetic_slide(f"{row.slide_id}.tif", spec, truth_path=f"{row.slide_id}.npz")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
from PIL import Image, ImageChops
from scipy import ndimage

from slidetrain.errors import ConfigError, SheetError
from slidetrain.io import atomic_path

if TYPE_CHECKING:  # pandas costs 0.2 s to import; per-slide jobs do not need it
    import pandas as pd

GRADE_NAMES = {0: "normal", 1: "low_grade", 2: "high_grade"}
GRADE_OF_NAME = {name: grade for grade, name in GRADE_NAMES.items()}

LEVEL0_MPP = 0.5  # 20x at level 0
CANVAS_DOWNSAMPLE = 4  # texture is drawn at 5x, the pipeline's working magnification
TRUTH_DOWNSAMPLE = 16  # macroscopic masks and ground truth
TILE_PX = 256
MIN_LEVELS = 3
SMALLEST_LEVEL_SIDE_PX = 500  # add levels until the smallest side drops below this

_BLOCK_ROWS = 32  # random numbers are drawn per block of 5x rows, so strips tile seamlessly
_HALO_ROWS = 8  # >= the largest filter radius used on the 5x canvas
# 5x canvas -> 10x and 20x: on this soft content as good as bicubic, and a third faster.
_UPSAMPLE = Image.Resampling.BILINEAR

# Stain optical-density directions (Macenko-style H&E vectors, unit length) and ink colours.
_H_OD = np.array([0.5626, 0.7201, 0.4062], np.float32)  # hematoxylin: purple-blue
_E_OD = np.array([0.2159, 0.8012, 0.5581], np.float32)  # eosin: pink
_BG_OD = np.array([0.025, 0.03, 0.022], np.float32)  # glass: near-white, slightly warm
_PEN_OD = {
    "green": np.array([1.3, 0.35, 0.95], np.float32),
    "blue": np.array([1.4, 0.8, 0.25], np.float32),
    "black": np.array([1.6, 1.6, 1.5], np.float32),
}
_DEBRIS_OD = np.array([0.9, 1.0, 1.15], np.float32)  # grey-brown dust

# Nucleus populations: (impulses per 5x px, gaussian sigma in 5x px, hematoxylin OD, offset
# subtracted from the blob profile, which sets how far a nucleus extends). Normal tissue's; the
# lesions' come from the difficulty (LesionLook), which in `classic` differ in density, size and
# darkness, each visible at 5x.
_NORMAL_NUCLEI = (0.012, 0.9, 1.55, 0.15)


@dataclass(frozen=True)
class LesionLook:
    """How lesion tissue differs from normal tissue in pixels; pairs are (low grade, high grade).

    Normal nuclei are (0.012, 0.9, 1.55, 0.15) in the units of `low_nuclei`. The defaults are the
    `classic` look: dark, dense nuclei in a basophilic, stroma-poor, gap-free region, which colour
    alone gives away. A look with lesion nuclei at the normal OD (1.55), little cytoplasm wash and
    stroma loss and the normal white gaps shows atypia in size, shape and density only.
    """

    # (nuclei per 5x px, nucleus gaussian sigma in 5x px, hematoxylin OD, profile offset: larger = smaller nucleus)
    low_nuclei: tuple[float, float, float, float] = (0.030, 1.25, 2.0, 0.1)
    high_nuclei: tuple[float, float, float, float] = (0.050, 1.6, 2.6, 0.05)
    irregularity: tuple[float, float] = (0.0, 0.4)  # amplitude of the noise that makes outlines uneven
    cytoplasm_od: tuple[float, float] = (0.35, 0.7)  # hematoxylin OD of the basophilic cytoplasm wash
    stroma_loss: tuple[float, float] = (0.35, 0.6)  # share of eosin the lesion crowds out
    lesion_gaps: float = 0.0  # share of normal tissue's white gaps (lumens, fat) that lesions keep

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LesionLook:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


CLASSIC_LOOK = LesionLook()


@dataclass(frozen=True)
class Difficulty:
    """What makes the grade hard to read: lesion size (drawn per slide), lesion look (pixels) and
    stain shifts between simulated sites. `classic` (all defaults) is the original task.

    Ranges are (low, high) of a uniform draw per slide; `n_lesions` is inclusive. A slide's site is
    a stable hash of its id (sites are not tied to the label or the split); each site scales
    hematoxylin and eosin by exp(N(0, site_stain_sd)), drawn once per (dataset seed, site), on top
    of the per-slide jitter and `stain_scale`.
    """

    lesion_fraction: tuple[float, float] = (0.08, 0.25)  # share of the tissue area that is lesion
    n_lesions: tuple[int, int] = (2, 6)
    n_sites: int = 0  # 0: no site effect
    site_stain_sd: float = 0.0
    low_nuclei: tuple[float, float, float, float] = CLASSIC_LOOK.low_nuclei
    high_nuclei: tuple[float, float, float, float] = CLASSIC_LOOK.high_nuclei
    irregularity: tuple[float, float] = CLASSIC_LOOK.irregularity
    cytoplasm_od: tuple[float, float] = CLASSIC_LOOK.cytoplasm_od
    stroma_loss: tuple[float, float] = CLASSIC_LOOK.stroma_loss
    lesion_gaps: float = CLASSIC_LOOK.lesion_gaps

    def look(self) -> LesionLook:
        return LesionLook(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LesionLook)})


# Graded presets, easiest first. hard draws lesion nuclei at the normal OD (atypia in size, outline and
# density only) on 2-6% of the tissue. mild is, key by key, the midpoint of classic and moderate, and
# subtle of moderate and hard (counts rounded up, the harder preset's sites; tests/test_synthetic_difficulty.py).
DIFFICULTY_PRESETS: dict[str, Difficulty] = {
    "classic": Difficulty(),
    "mild": Difficulty(
        lesion_fraction=(0.06, 0.185),
        n_lesions=(2, 5),
        n_sites=4,
        site_stain_sd=0.05,
        low_nuclei=(0.025, 1.175, 1.875, 0.11),
        high_nuclei=(0.039, 1.45, 2.25, 0.075),
        irregularity=(0.1, 0.4),
        cytoplasm_od=(0.225, 0.45),
        stroma_loss=(0.25, 0.45),
        lesion_gaps=0.25,
    ),
    "moderate": Difficulty(
        lesion_fraction=(0.04, 0.12),
        n_lesions=(1, 4),
        n_sites=4,
        site_stain_sd=0.1,
        low_nuclei=(0.020, 1.1, 1.75, 0.12),
        high_nuclei=(0.028, 1.3, 1.9, 0.1),
        irregularity=(0.2, 0.4),
        cytoplasm_od=(0.1, 0.2),
        stroma_loss=(0.15, 0.3),
        lesion_gaps=0.5,
    ),
    "subtle": Difficulty(
        lesion_fraction=(0.03, 0.09),
        n_lesions=(1, 4),
        n_sites=4,
        site_stain_sd=0.125,
        low_nuclei=(0.018, 1.075, 1.65, 0.125),
        high_nuclei=(0.024, 1.25, 1.75, 0.11),
        irregularity=(0.225, 0.425),
        cytoplasm_od=(0.065, 0.13),
        stroma_loss=(0.1, 0.21),
        lesion_gaps=0.65,
    ),
    "hard": Difficulty(
        lesion_fraction=(0.02, 0.06),
        n_lesions=(1, 3),
        n_sites=4,
        site_stain_sd=0.15,
        low_nuclei=(0.016, 1.05, 1.55, 0.13),
        high_nuclei=(0.020, 1.2, 1.6, 0.12),
        irregularity=(0.25, 0.45),
        cytoplasm_od=(0.03, 0.06),
        stroma_loss=(0.05, 0.12),
        lesion_gaps=0.8,
    ),
}


# Per key of Difficulty: (items in the value, or 0 for a scalar, the allowed interval, the item type).
_DIFFICULTY_KEYS: dict[str, tuple[int, tuple[float, float], type]] = {
    "lesion_fraction": (2, (0.001, 0.9), float),
    "n_lesions": (2, (1, 50), int),
    "n_sites": (0, (0, 1000), int),
    "site_stain_sd": (0, (0.0, 1.0), float),
    "low_nuclei": (4, (0.0, 10.0), float),
    "high_nuclei": (4, (0.0, 10.0), float),
    "irregularity": (2, (0.0, 2.0), float),
    "cytoplasm_od": (2, (0.0, 3.0), float),
    "stroma_loss": (2, (0.0, 0.8), float),
    "lesion_gaps": (0, (0.0, 1.0), float),
}


def _difficulty_value(key: str, value: Any) -> Any:
    """One override checked against _DIFFICULTY_KEYS: a number or a list of the right length in range."""
    n_items, (lo, hi), kind = _DIFFICULTY_KEYS[key]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    shape = f"{n_items} numbers" if n_items else "a number"
    ok = isinstance(value, (list, tuple)) == (n_items > 0) and len(items) == max(n_items, 1)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
    ok = ok and all(lo <= v <= hi and (kind is float or float(v).is_integer()) for v in items)
    if ok and key in ("lesion_fraction", "n_lesions"):
        ok = items[0] <= items[1]
    if ok and key in ("low_nuclei", "high_nuclei"):
        ok = items[0] <= 1.0 and items[1] > 0
    if not ok:
        raise ConfigError(
            f"synthetic_difficulty_overrides.{key} = {value!r}: expected {shape} in [{lo}, {hi}]"
            + (" (low <= high)" if key in ("lesion_fraction", "n_lesions") else "")
            + (" (nuclei per px <= 1, sigma > 0)" if key.endswith("_nuclei") else "")
        )
    items = [kind(v) for v in items]
    return tuple(items) if n_items else items[0]


def resolve_difficulty(name: str = "classic", overrides: dict[str, Any] | None = None) -> Difficulty:
    """The preset `name` (DIFFICULTY_PRESETS) with per-key `overrides`; an unknown name, key or a bad
    value is a ConfigError naming it."""
    if name not in DIFFICULTY_PRESETS:
        raise ConfigError(f"synthetic_difficulty = {name!r}: expected one of {sorted(DIFFICULTY_PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_DIFFICULTY_KEYS))
    if unknown:
        raise ConfigError(
            f"synthetic_difficulty_overrides: unknown keys {unknown}; expected some of {list(_DIFFICULTY_KEYS)}"
        )
    return dataclasses.replace(DIFFICULTY_PRESETS[name], **{k: _difficulty_value(k, v) for k, v in overrides.items()})


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything needed to draw one synthetic slide; `seed` drives all random detail.

    Sizes are level-0 pixels at `mpp`. Fractions are targets that the drawing
    meets on the downsample-16 truth grid (lesions exactly; tissue up to the
    crumbs it removes). Change a field with
    `dataclasses.replace` (e.g. a 40,960 x 30,720 benchmark slide); the rest of
    the drawing adapts.
    """

    slide_id: str
    label: str  # a GRADE_NAMES value
    seed: int  # drawing seed, derived from (slide_id, dataset seed)
    width_px: int
    height_px: int
    n_pieces: int  # tissue pieces, 1-4
    tissue_fraction: float  # share of the slide area covered by tissue
    lesion_fraction: float  # share of the tissue area that is lesion (0 for normal)
    n_lesions: int  # lesion blobs (0 for normal)
    high_grade_share: float  # share of lesion blobs that are high grade
    has_pen: bool
    pen_color: str  # "green", "blue" or "black"
    has_debris: bool
    stain_h: float  # slide-level hematoxylin strength (staining batch variation)
    stain_e: float  # slide-level eosin strength
    mpp: float = LEVEL0_MPP
    jpeg_quality: int = 90
    tile_px: int = TILE_PX
    # Set by a difficulty other than `classic` only; None leaves them out of to_dict, so a classic
    # spec (and the TIFF description and truth file that carry it) is the same as before they existed.
    site: int | None = None  # simulated staining site (Difficulty.n_sites)
    lesion_look: LesionLook | None = None  # None: CLASSIC_LOOK

    @property
    def grade(self) -> int:
        return GRADE_OF_NAME[self.label]

    @property
    def look(self) -> LesionLook:
        return self.lesion_look or CLASSIC_LOOK

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SyntheticSpec:
        d = dict(d)
        if d.get("lesion_look") is not None:
            d["lesion_look"] = LesionLook.from_dict(d["lesion_look"])
        return cls(**d)


# ----------------------------------------------------------------------------- sheet and spec


def synthetic_sheet(n_slides: int, seed: int, two_slide_patient_fraction: float = 0.2) -> pd.DataFrame:
    """A slide sheet (slide_id, patient_id, label, source) for `n_slides` synthetic slides.

    About `two_slide_patient_fraction` of the patients own two slides with the
    same label, so patient-grouped splitting is exercised. Labels are assigned
    round-robin over patients (two-slide patients first), so classes are
    balanced to within a few slides. Vectorised: 10,000+ slides in milliseconds.
    """
    import pandas as pd

    if n_slides < 1:
        raise ConfigError(f"synthetic n_slides must be >= 1, got {n_slides}")
    if not 0.0 <= two_slide_patient_fraction <= 1.0:
        raise ConfigError(f"two_slide_patient_fraction must be in [0, 1], got {two_slide_patient_fraction}")
    rng = np.random.default_rng([int(seed), 0x5EE7])
    n_patients = max(1, round(n_slides / (1.0 + two_slide_patient_fraction)))
    n_patients = max(n_patients, math.ceil(n_slides / 2))
    n_pairs = n_slides - n_patients  # patients owning two slides
    n_classes = len(GRADE_NAMES)
    class_order = rng.permutation(n_classes)  # which class gets the leftovers is random
    group_label = class_order[np.arange(n_patients) % n_classes]  # pairs are groups 0..n_pairs-1
    group_size = np.where(np.arange(n_patients) < n_pairs, 2, 1)
    slide_group = np.repeat(np.arange(n_patients), group_size)  # (n_slides,)
    patient_number = rng.permutation(n_patients)[slide_group]
    slide_number = rng.permutation(n_slides)  # so a patient's two slides are not neighbours
    slide_width = max(4, len(str(n_slides - 1)))
    patient_width = max(3, len(str(n_patients - 1)))
    names = np.array([GRADE_NAMES[g] for g in range(n_classes)], dtype=object)
    sheet = pd.DataFrame(
        {
            "slide_id": [f"syn_{i:0{slide_width}d}" for i in slide_number],
            "patient_id": [f"pat_{i:0{patient_width}d}" for i in patient_number],
            "label": names[group_label[slide_group]],
            "source": "synthetic",
        }
    )
    return sheet.sort_values("slide_id", kind="stable").reset_index(drop=True)


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def synthetic_spec(
    slide_id: str,
    label: str,
    seed: int,
    size_range_px: tuple[int, int] = (3000, 6000),
    stain_scale: tuple[float, float] = (1.0, 1.0),
    difficulty: Difficulty | None = None,
) -> SyntheticSpec:
    """The drawing spec of one slide, a pure function of (slide_id, label, seed, stain_scale, difficulty).

    The random draws do not depend on the label (only which of them are used
    does), so size, pieces, pen and stain carry no information about the class.
    The longer level-0 side is uniform in `size_range_px`, rounded to 16 px.
    `stain_scale` (hematoxylin, eosin) multiplies every slide's drawn stain
    strengths: another staining centre (an external cohort's stain shift); the
    random draws are the same, so (1, 1) is the dataset as before.
    `difficulty` (None: `classic`, see resolve_difficulty) sets the lesion ranges,
    the lesions' look and the site stain shifts; the site draws use their own
    random streams, so the other fields are drawn as in `classic`.
    """
    difficulty = difficulty or DIFFICULTY_PRESETS["classic"]
    if label not in GRADE_OF_NAME:
        raise SheetError(
            f"slide {slide_id}: unknown synthetic label {label!r}; expected one of {sorted(GRADE_OF_NAME)}"
        )
    lo, hi = (int(v) for v in size_range_px)
    if not 512 <= lo <= hi:
        raise ConfigError(f"synthetic size_range_px must satisfy 512 <= low <= high, got {size_range_px}")
    scale_h, scale_e = (float(v) for v in stain_scale)
    if not (0.25 <= scale_h <= 4 and 0.25 <= scale_e <= 4):
        raise ConfigError(
            f"synthetic stain_scale must be two factors in [0.25, 4] (hematoxylin, eosin), got {stain_scale}"
        )
    grade = GRADE_OF_NAME[label]
    rng = np.random.default_rng(_stable_seed("synthetic-spec", seed, slide_id))
    long_px = int(rng.integers(lo, hi + 1))
    aspect = float(rng.uniform(0.62, 0.9))
    landscape = bool(rng.random() < 0.7)
    long_px = max(512, 16 * round(long_px / 16))
    short_px = max(512, 16 * round(long_px * aspect / 16))
    n_pieces = int(rng.integers(1, 5))
    tissue_fraction = float(rng.uniform(0.25, 0.5))
    lesion_fraction = float(rng.uniform(*difficulty.lesion_fraction))
    n_lesions = int(rng.integers(difficulty.n_lesions[0], difficulty.n_lesions[1] + 1))
    high_share = float(rng.uniform(0.6, 1.0))
    has_pen = bool(rng.random() < 0.15)
    pen_color = str(rng.choice(sorted(_PEN_OD)))
    has_debris = bool(rng.random() < 0.3)
    stain_h = float(rng.uniform(0.88, 1.12))
    stain_e = float(rng.uniform(0.85, 1.15))
    draw_seed = int(rng.integers(0, 2**62))
    site, (site_h, site_e) = _site_stain(slide_id, seed, difficulty)
    look = difficulty.look()
    return SyntheticSpec(
        slide_id=str(slide_id),
        label=label,
        seed=draw_seed,
        width_px=long_px if landscape else short_px,
        height_px=short_px if landscape else long_px,
        n_pieces=n_pieces,
        tissue_fraction=tissue_fraction,
        lesion_fraction=lesion_fraction if grade > 0 else 0.0,
        n_lesions=n_lesions if grade > 0 else 0,
        high_grade_share=high_share if grade == 2 else 0.0,
        has_pen=has_pen,
        pen_color=pen_color,
        has_debris=has_debris,
        stain_h=stain_h * scale_h * site_h,
        stain_e=stain_e * scale_e * site_e,
        site=site,
        lesion_look=None if look == CLASSIC_LOOK else look,
    )


def _site_stain(slide_id: str, seed: int, difficulty: Difficulty) -> tuple[int | None, tuple[float, float]]:
    """(site, (hematoxylin, eosin) factors) of a slide; (None, (1, 1)) without sites.

    The site is a stable hash of the slide id, and its factors a draw seeded by (dataset seed,
    site): the same for every slide of the site, independent of the label.
    """
    if difficulty.n_sites == 0:
        return None, (1.0, 1.0)
    site = _stable_seed("synthetic-site", seed, slide_id) % difficulty.n_sites
    rng = np.random.default_rng(_stable_seed("synthetic-site-stain", seed, site))
    factors = np.exp(rng.normal(0.0, difficulty.site_stain_sd, size=2))
    return site, (float(factors[0]), float(factors[1]))


# ----------------------------------------------------------------------------- macroscopic layout


@dataclass
class _Layout:
    """Masks on the downsample-16 grid (the ground truth) plus what texturing needs."""

    tissue: np.ndarray  # (h, w) bool
    lesion_grade: np.ndarray  # (h, w) uint8: 0 none, 1 low, 2 high
    pen: np.ndarray  # (h, w) bool
    debris: np.ndarray  # (h, w) bool
    fields_a: np.ndarray  # (h, w, 3) uint8: soft tissue, low-grade, high-grade masks
    fields_b: np.ndarray  # (h, w, 3) uint8: white gaps, pen alpha, stain variation
    fields_c: np.ndarray  # (h, w, 3) uint8: nucleus density variation, fibre orientation, unused
    # Level-0 (x, y, radius, kind): kind 0 a dust speck, 1 an air bubble.
    debris_objects: list[tuple[float, float, float, int]]


def _grid_shape(spec: SyntheticSpec) -> tuple[int, int]:
    return math.ceil(spec.height_px / TRUTH_DOWNSAMPLE), math.ceil(spec.width_px / TRUTH_DOWNSAMPLE)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Unit-variance smooth noise (h, w) with features about `cell_px` grid pixels across."""
    h, w = shape
    cell_px = max(float(cell_px), 1.0)
    coarse = rng.standard_normal((math.ceil(h / cell_px) + 3, math.ceil(w / cell_px) + 3)).astype(np.float32)
    img = Image.fromarray(coarse)
    box = (1.0, 1.0, 1.0 + w / cell_px, 1.0 + h / cell_px)
    out = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC, box=box), np.float32)  # (h, w)
    return (out - out.mean()) / (out.std() + 1e-6)


def _threshold_for_share(values: np.ndarray, share: float) -> float:
    """The value above which `share` of `values` lies."""
    return float(np.quantile(values, 1.0 - share)) if values.size else 0.0


def _tissue_mask(spec: SyntheticSpec, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """1-4 irregular pieces in slots along the long axis, thresholded to the target coverage."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n = spec.n_pieces
    if n == 4:
        slots = [(r, c, 2, 2) for r in range(2) for c in range(2)]
    elif w >= h:
        slots = [(0, c, 1, n) for c in range(n)]
    else:
        slots = [(r, 0, n, 1) for r in range(n)]
    field = np.full(shape, -np.inf, np.float32)
    for r, c, nr, nc in slots:
        sh, sw = h / nr, w / nc
        cy = (r + 0.5 + rng.uniform(-0.12, 0.12)) * sh
        cx = (c + 0.5 + rng.uniform(-0.12, 0.12)) * sw
        ay, ax = rng.uniform(0.3, 0.45) * sh, rng.uniform(0.3, 0.45) * sw
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / ax
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ay
        piece = 1.0 - np.sqrt(u * u + v * v)
        wobble = _smooth_noise(rng, shape, min(ay, ax) / 2.0)
        field = np.maximum(field, piece + 0.22 * wobble)
    # Slides are cut and mounted with a margin of glass: push tissue away from the border.
    edge = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx)) / (0.06 * min(h, w))
    field -= 0.8 * np.clip(1.0 - edge, 0.0, 1.0)
    tissue = field > _threshold_for_share(field, spec.tissue_fraction)
    # A real tissue piece has no one-pixel crumbs; keep only sizeable components.
    labels, n_labels = ndimage.label(tissue)
    if n_labels > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= max(8, 0.02 * sizes.max())
        tissue = keep[labels]
    return tissue


def _lesion_grade(spec: SyntheticSpec, rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Lesion blobs inside tissue covering `lesion_fraction` of it; each blob low or high grade."""
    grade_map = np.zeros(tissue.shape, np.uint8)
    if spec.n_lesions == 0 or spec.lesion_fraction <= 0 or not tissue.any():
        return grade_map
    depth = ndimage.distance_transform_edt(tissue)  # (h, w) grid px to the tissue edge
    # Centres well inside tissue (but on tiny tissue, wherever is deepest).
    ys, xs = np.nonzero(depth >= min(depth.max(), max(2.0, 0.3 * depth.max())))
    tissue_area = float(tissue.sum())
    radius0 = math.sqrt(spec.lesion_fraction * tissue_area / (spec.n_lesions * np.pi))
    n_high = round(spec.high_grade_share * spec.n_lesions)
    if spec.grade == 2:
        n_high = max(1, n_high)
    blob_grades = np.array([2] * n_high + [1] * (spec.n_lesions - n_high))
    rng.shuffle(blob_grades)
    h, w = tissue.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    best = np.full(tissue.shape, -np.inf, np.float32)
    owner = np.zeros(tissue.shape, np.int64)
    wobble = _smooth_noise(rng, tissue.shape, max(radius0 / 2.0, 1.5))
    for k in range(spec.n_lesions):
        i = int(rng.integers(len(ys)))
        radius = radius0 * rng.uniform(0.7, 1.3)
        f = 1.0 - np.hypot(yy - ys[i], xx - xs[i]) / radius
        better = f > best
        best[better] = f[better]
        owner[better] = k
    best = best + 0.3 * wobble
    inside = best[tissue]
    lesion = (best > _threshold_for_share(inside, spec.lesion_fraction)) & tissue
    grade_map[lesion] = blob_grades[owner[lesion]]
    return grade_map


def _pen_mask(spec: SyntheticSpec, rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """1-3 thick strokes: loops circling tissue and lines from the margin, partly over tissue."""
    from skimage.draw import line as draw_line

    h, w = tissue.shape
    skeleton = np.zeros(tissue.shape, bool)
    ty, tx = np.nonzero(tissue)
    cy, cx = (ty.mean(), tx.mean()) if len(ty) else (h / 2, w / 2)
    n_strokes = int(rng.integers(1, 4))
    for s in range(n_strokes):
        if s == 0 or rng.random() < 0.4:  # a pathologist's loop around a region
            j = int(rng.integers(len(ty))) if len(ty) else 0
            oy, ox = (ty[j], tx[j]) if len(ty) else (cy, cx)
            radius = rng.uniform(0.15, 0.3) * max(h, w)
            start = rng.uniform(0, 2 * np.pi)
            angles = start + np.linspace(0, rng.uniform(1.4, 1.9) * np.pi, 80)
            r = radius * (1 + 0.08 * np.sin(3 * angles + rng.uniform(0, 6)))
            py, px = oy + r * np.sin(angles) * 0.8, ox + r * np.cos(angles)
        else:  # a line from the margin into the slide
            side = int(rng.integers(4))
            t0 = rng.uniform(0.1, 0.9)
            y0, x0 = [(0, t0 * w), (h - 1, t0 * w), (t0 * h, 0), (t0 * h, w - 1)][side]
            heading = np.arctan2(cy - y0, cx - x0) + rng.uniform(-0.5, 0.5)
            length = rng.uniform(0.25, 0.5) * max(h, w)
            t = np.linspace(0, 1, 60)
            bend = 0.15 * length * np.sin(np.pi * t * rng.uniform(1, 2))
            py = y0 + t * length * np.sin(heading) + bend * np.cos(heading)
            px = x0 + t * length * np.cos(heading) - bend * np.sin(heading)
        py = np.clip(np.round(py), 0, h - 1).astype(int)
        px = np.clip(np.round(px), 0, w - 1).astype(int)
        for i in range(len(py) - 1):
            rr, cc = draw_line(py[i], px[i], py[i + 1], px[i + 1])
            skeleton[rr, cc] = True
    width = max(1.5, rng.uniform(0.008, 0.016) * max(h, w))  # half-width in grid px
    return ndimage.distance_transform_edt(~skeleton) <= width


def _debris(spec: SyntheticSpec, rng: np.random.Generator, tissue: np.ndarray) -> list[tuple[float, float, float, int]]:
    """Dust specks and a few air bubbles in level-0 px, mostly on the background."""
    h, w = tissue.shape
    objects = []
    n_specks = int(rng.integers(8, 40))
    n_bubbles = int(rng.integers(0, 3))
    for kind, count in ((0, n_specks), (1, n_bubbles)):
        for _ in range(count):
            for _attempt in range(10):  # prefer glass; debris over tissue is rarer
                gy, gx = rng.uniform(0, h), rng.uniform(0, w)
                if not tissue[int(gy), int(gx)] or rng.random() < 0.1:
                    break
            radius = rng.uniform(6, 30) if kind == 0 else rng.uniform(60, 200)
            objects.append((gx * TRUTH_DOWNSAMPLE, gy * TRUTH_DOWNSAMPLE, float(radius), kind))
    return objects


def _debris_mask(objects: list[tuple[float, float, float, int]], shape: tuple[int, int]) -> np.ndarray:
    """Debris discs rasterised on the truth grid (h, w): at least the cell each one falls in."""
    mask = np.zeros(shape, bool)
    for x, y, radius, _kind in objects:
        gx, gy = x / TRUTH_DOWNSAMPLE - 0.5, y / TRUTH_DOWNSAMPLE - 0.5  # cell-centre coordinates
        gr = max(radius / TRUTH_DOWNSAMPLE, 0.75)
        y0, y1 = max(0, int(gy - gr)), min(shape[0], int(gy + gr) + 2)
        x0, x1 = max(0, int(gx - gr)), min(shape[1], int(gx + gr) + 2)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (yy - gy) ** 2 + (xx - gx) ** 2 <= gr * gr
    return mask


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _layout(spec: SyntheticSpec) -> _Layout:
    """Draw the macroscopic masks (ground truth) and the smooth fields the texturing reads."""
    rng = np.random.default_rng([spec.seed, 1])
    shape = _grid_shape(spec)
    tissue = _tissue_mask(spec, rng, shape)
    grade = _lesion_grade(spec, np.random.default_rng([spec.seed, 2]), tissue)
    pen = _pen_mask(spec, np.random.default_rng([spec.seed, 3]), tissue) if spec.has_pen else np.zeros(shape, bool)
    objects = _debris(spec, np.random.default_rng([spec.seed, 4]), tissue) if spec.has_debris else []
    debris = _debris_mask(objects, shape)

    rng = np.random.default_rng([spec.seed, 5])
    um_per_cell = LEVEL0_MPP * TRUTH_DOWNSAMPLE  # 8 um per grid px, so physical scales stay fixed

    def soft(mask: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(mask.astype(np.float32), 0.7)

    gaps = _smooth_noise(rng, shape, 70 / um_per_cell)
    # Lumens, fat, tears: white spaces in normal tissue; lesions keep `lesion_gaps` of them (none in
    # classic's dense lesions). float32 factors: x * 1 and x * 0 as the classic bool mask gave.
    kept = np.where(grade == 0, np.float32(1.0), np.float32(spec.look.lesion_gaps))
    gaps = np.clip((gaps - 1.3) * 1.5, 0, 1) * kept
    stain = 0.5 + 0.12 * _smooth_noise(rng, shape, 600 / um_per_cell)
    density = 0.5 + 0.15 * _smooth_noise(rng, shape, 250 / um_per_cell)
    orient = 0.5 + 0.5 * np.tanh(3.0 * _smooth_noise(rng, shape, 150 / um_per_cell))
    fields_a = np.stack([soft(tissue), soft(grade == 1), soft(grade == 2)], axis=-1)  # (h, w, 3)
    fields_b = np.stack([gaps, soft(pen), stain], axis=-1)
    fields_c = np.stack([density, orient, np.zeros(shape, np.float32)], axis=-1)
    return _Layout(
        tissue=tissue,
        lesion_grade=grade,
        pen=pen,
        debris=debris,
        fields_a=_to_u8(fields_a),
        fields_b=_to_u8(fields_b),
        fields_c=_to_u8(fields_c),
        debris_objects=objects,
    )


# ----------------------------------------------------------------------------- 5x texture


def _canvas_shape(spec: SyntheticSpec) -> tuple[int, int]:
    h, w = spec.height_px, spec.width_px
    return math.ceil(h / CANVAS_DOWNSAMPLE), math.ceil(w / CANVAS_DOWNSAMPLE)


def _block_noise(seed: int, rows: tuple[int, int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform and normal noise (rows, width) for 5x rows [r0, r1), identical for any strip split."""
    r0, r1 = rows
    uniforms, normals = [], []
    for b in range(r0 // _BLOCK_ROWS, (r1 - 1) // _BLOCK_ROWS + 1):
        rng = np.random.default_rng([seed, 6, b])
        uniforms.append(rng.random((_BLOCK_ROWS, width), dtype=np.float32))
        normals.append(rng.standard_normal((_BLOCK_ROWS, width), dtype=np.float32))
    off = r0 - (r0 // _BLOCK_ROWS) * _BLOCK_ROWS
    return (
        np.concatenate(uniforms)[off : off + r1 - r0],  # (rows, width)
        np.concatenate(normals)[off : off + r1 - r0],
    )


def _upsample_planes(fields: np.ndarray, rows: tuple[int, int], width: int) -> list[np.ndarray]:
    """Bilinear 4x upsampling of grid fields (gh, gw, 3) uint8 to 5x rows [r0, r1).

    Returns three (rows, width) float32 planes in [0, 1]: planes, not one
    (rows, width, 3) array, because numpy is several times slower on a
    trailing axis of length 3. Every output pixel is computed from the same
    source pixels and weights whatever the strip, so strips join exactly.
    """
    factor = TRUTH_DOWNSAMPLE // CANVAS_DOWNSAMPLE  # 4
    gh, gw = fields.shape[:2]
    pos = (np.arange(rows[0], rows[1]) + 0.5) / factor - 0.5  # source row of each output row
    i0 = np.floor(pos).astype(np.int64)
    wy = (pos - i0).astype(np.float32)[:, None, None]
    top = fields[np.clip(i0, 0, gh - 1)].astype(np.float32)  # (he, gw, 3)
    bottom = fields[np.clip(i0 + 1, 0, gh - 1)].astype(np.float32)
    by_rows = top + wy * (bottom - top)
    by_rows *= 1.0 / 255.0
    # Columns: output column 4j + k lies between source columns j - 1 + (k >= 2) and the next,
    # at fixed fractions, so four strided slices replace a gather.
    planes = []
    for c in range(3):
        src = np.pad(by_rows[..., c], ((0, 0), (1, 1)), mode="edge")  # (he, gw + 2)
        left, mid, right = src[:, :-2], src[:, 1:-1], src[:, 2:]
        out = np.empty((len(pos), gw, factor), np.float32)
        out[..., 0] = 0.375 * left + 0.625 * mid
        out[..., 1] = 0.125 * left + 0.875 * mid
        out[..., 2] = 0.875 * mid + 0.125 * right
        out[..., 3] = 0.625 * mid + 0.375 * right
        planes.append(out.reshape(len(pos), gw * factor)[:, :width])
    return planes


def _ramp(plane: np.ndarray, gain: float) -> np.ndarray:
    """A soft mask in [0, 1] (edge at 0.5) sharpened: clip((x - 0.5) * gain + 0.5)."""
    out = plane * gain
    out += 0.5 - 0.5 * gain
    return np.clip(out, 0.0, 1.0, out=out)


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3.5)


def _gauss1d(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    return ndimage.gaussian_filter1d(x, sigma, axis=axis, mode="nearest", truncate=3.5)


_FIBRE_SIGMA = 2.2  # 5x px along a fibre; across it the noise stays white
# 1-D gaussian smoothing leaves white noise with variance 1 / (2 sqrt(pi) sigma): undo that.
_FIBRE_GAIN = math.sqrt(2.0 * math.sqrt(np.pi) * _FIBRE_SIGMA)


def _stroma_fibres(nrm: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """Stroma fibres (he, W5), unit variance: noise smoothed along x or along y, the direction
    switching between regions (`orient` 1 = along x, 0 = along y)."""
    fib_y = _gauss1d(nrm, _FIBRE_SIGMA, axis=0)
    fib = _gauss1d(nrm, _FIBRE_SIGMA, axis=1)
    fib -= fib_y
    fib *= orient
    fib += fib_y
    fib *= _FIBRE_GAIN
    return fib


def _nuclei_density(
    look: LesionLook,
    tissue: np.ndarray,
    low_m: np.ndarray,
    high_m: np.ndarray,
    gaps: np.ndarray,
    dens_f: np.ndarray,
    uni: np.ndarray,
    nrm: np.ndarray,
) -> np.ndarray:
    """Hematoxylin optical density (he, W5) of the nuclei: sparse impulses blurred into round blobs of
    each population's size (normal tissue, low- and high-grade lesions)."""
    density = dens_f * 1.2 + 0.4  # ~1 +- 35% in normal tissue
    normal_w = tissue * np.clip(1.0 - low_m - high_m, 0.0, 1.0) * density * (1.0 - gaps)
    low_w, high_w = low_m * tissue, high_m * tissue
    if look.lesion_gaps:  # lesions that keep white gaps keep them free of nuclei too
        low_w *= 1.0 - gaps
        high_w *= 1.0 - gaps
    hema = np.zeros_like(tissue)
    populations = (
        (_NORMAL_NUCLEI, 0.0, normal_w),
        (look.low_nuclei, look.irregularity[0], low_w),
        (look.high_nuclei, look.irregularity[1], high_w),
    )
    for (rate, sigma, od, thresh), irregularity, weight in populations:
        if not weight.any():
            continue
        impulses = (uni < rate * weight).astype(np.float32)
        blob = _gauss(impulses, sigma)
        blob *= 2 * np.pi * sigma * sigma * 1.6  # ~1.6 at an isolated nucleus centre
        if irregularity:  # pleomorphic: irregular outlines, uneven chromatin
            lumpy = _gauss(nrm, 0.8)
            lumpy *= irregularity * 2.0 * math.sqrt(np.pi) * 0.8  # irregularity x unit-variance isotropic noise
            lumpy += 1.0
            blob *= lumpy
        # A soft ramp, not a hard threshold: 2-4 px nuclei stay round after upsampling to 20x.
        blob -= thresh
        np.clip(blob, 0.0, 1.0, out=blob)
        blob *= od
        np.maximum(hema, blob, out=hema)
    return hema


def _render_strip(spec: SyntheticSpec, layout: _Layout, rows: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (rows, W5, 3) of the 5x canvas: stroma, nuclei, lesions, ink and dust.

    Filters run on the rows plus a halo, whose random numbers come from the
    same fixed row blocks as the neighbouring strip's, so strips join seamlessly.
    """
    h5, w5 = _canvas_shape(spec)
    r0, r1 = rows
    e0, e1 = max(0, r0 - _HALO_ROWS), min(h5, r1 + _HALO_ROWS)  # extended rows for the filters
    uni, nrm = _block_noise(spec.seed, (e0, e1), w5)  # (he, W5) each
    tis_f, low_f, high_f = _upsample_planes(layout.fields_a, (e0, e1), w5)  # (he, W5) float32 each
    gaps, pen_f, stain_f = _upsample_planes(layout.fields_b, (e0, e1), w5)
    dens_f, orient, _ = _upsample_planes(layout.fields_c, (e0, e1), w5)
    tissue = _ramp(tis_f, 4.0)  # (he, W5) crisp but anti-aliased edge
    low_m = _ramp(low_f, 3.0)  # lesion membership, inside tissue or not
    high_m = _ramp(high_f, 3.0)

    fib = _stroma_fibres(nrm, orient)  # (he, W5), unit variance
    look = spec.look
    hema = _nuclei_density(look, tissue, low_m, high_m, gaps, dens_f, uni, nrm)  # (he, W5) optical density

    # Halo no longer needed: crop everything to the strip's own rows.
    keep = slice(r0 - e0, r1 - e0)
    tissue, low_m, high_m, gaps, fib, hema, nrm = (a[keep] for a in (tissue, low_m, high_m, gaps, fib, hema, nrm))
    low, high = low_m * tissue, high_m * tissue
    hema += 0.06 * tissue + look.cytoplasm_od[0] * low + look.cytoplasm_od[1] * high  # basophilic cytoplasm
    hema *= spec.stain_h

    stain = stain_f[keep] + 0.26  # slow staining variation
    eosin = np.clip(0.62 + 0.28 * fib, 0.15, 1.1)
    eosin *= tissue
    eosin *= 1.0 - gaps
    eosin *= stain
    eosin *= np.clip(1.0 - look.stroma_loss[0] * low_m - look.stroma_loss[1] * high_m, 0.2, 1.0)  # crowded out
    eosin *= 0.55 * spec.stain_e

    pen = pen_f[keep] if spec.has_pen else None
    dust = _debris_alpha(layout.debris_objects, r0, (r1 - r0, w5)) if layout.debris_objects else None
    glass = 0.006 * nrm  # mild background noise
    out = np.empty((r1 - r0, w5, 3), np.uint8)
    for c in range(3):  # Beer-Lambert: optical densities add, transmission multiplies
        od = eosin * _E_OD[c]
        od += hema * _H_OD[c]
        od += glass
        od += _BG_OD[c]
        if pen is not None:
            od += pen * _PEN_OD[spec.pen_color][c]
        if dust is not None:
            od += dust * _DEBRIS_OD[c]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        od += 0.5
        out[..., c] = np.clip(od, 0, 255)
    return out


def _debris_alpha(objects: list[tuple[float, float, float, int]], row0: int, shape: tuple[int, int]) -> np.ndarray:
    """Optical-density weight (rows, W5) of dust specks (dark discs) and bubbles (dark rings)."""
    h, w = shape
    alpha = np.zeros(shape, np.float32)
    for x, y, radius, kind in objects:
        cx, cy, r = x / CANVAS_DOWNSAMPLE, y / CANVAS_DOWNSAMPLE - row0, radius / CANVAS_DOWNSAMPLE
        y0, y1 = max(0, int(cy - r - 2)), min(h, int(cy + r + 3))
        x0, x1 = max(0, int(cx - r - 2)), min(w, int(cx + r + 3))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dist = np.sqrt((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2)  # (wy, wx)
        if kind == 0:
            a = np.clip(r - dist + 0.5, 0, 1) * 1.2
        else:
            a = np.clip(1.6 - np.abs(dist - r), 0, 1) * 0.5 + np.clip(r - dist, 0, 1) * 0.04
        alpha[y0:y1, x0:x1] += a
    return alpha


def _strip_rows(width: int) -> int:
    """5x rows per strip: about 2 Mpx per strip bounds memory on wide slides."""
    return int(np.clip((2**21 // max(width, 1)) // _BLOCK_ROWS * _BLOCK_ROWS, 64, 512))


def _render_canvas_image(spec: SyntheticSpec, layout: _Layout) -> Image.Image:
    """The whole 5x canvas as a PIL image (PIL is what resamples it into levels 0 and 1)."""
    h5, w5 = _canvas_shape(spec)
    canvas = Image.new("RGB", (w5, h5))
    step = _strip_rows(w5)
    for r0 in range(0, h5, step):
        r1 = min(h5, r0 + step)
        canvas.paste(Image.fromarray(_render_strip(spec, layout, (r0, r1))), (0, r0))
    return canvas


def render_canvas(spec: SyntheticSpec) -> np.ndarray:
    """The slide at 5x (downsample 4), RGB uint8 (ceil(H/4), ceil(W/4), 3): level 2 of the file."""
    return np.asarray(_render_canvas_image(spec, _layout(spec)))


# ----------------------------------------------------------------------------- TIFF writing


def pyramid_shapes(width_px: int, height_px: int) -> list[tuple[int, int]]:
    """(height, width) per level: downsample 2 per level until the smallest side is < 500 px."""
    shapes = [(height_px, width_px)]
    while len(shapes) < MIN_LEVELS or min(shapes[-1]) >= SMALLEST_LEVEL_SIDE_PX:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def _grain(seed: int, rows: int, width: int) -> np.ndarray:
    """Fine additive grain (rows, width, 3) uint8 centred on 128: the 20x detail a 5x canvas lacks."""
    rng = np.random.default_rng([seed, 8])
    noise = ndimage.gaussian_filter(rng.standard_normal((rows, width), dtype=np.float32), 0.6)
    noise *= 3.0 / (noise.std() + 1e-6)
    return np.repeat(np.clip(np.round(noise + 128.0), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def _upsampled_tiles(
    canvas_img: Image.Image,
    shape: tuple[int, int],
    factor: int,
    tile_px: int,
    grain: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Tiles (tile_px, tile_px, 3) in row-major order of the canvas upsampled by `factor`.

    One tile row is resampled at a time (bilinear, with the neighbouring canvas
    rows as support), so memory is one strip, not the whole level. `grain`
    (tile_px, w, 3), shifted per strip so it does not repeat visibly, is added
    to every strip.
    """
    h, w = shape
    for y in range(0, h, tile_px):
        rows = min(tile_px, h - y)
        box = (
            0.0,
            y / factor,
            min(w / factor, canvas_img.width),
            min((y + rows) / factor, canvas_img.height),
        )
        strip_img = canvas_img.resize((w, rows), _UPSAMPLE, box=box)
        if grain is not None:
            shifted = np.roll(grain[:rows], (y // tile_px) * 7919 % w, axis=1)
            strip_img = ImageChops.add(strip_img, Image.fromarray(shifted), 1.0, -128)
        yield from _strip_tiles(np.asarray(strip_img), tile_px)  # (rows, w, 3) strip


def _image_tiles(image: Image.Image, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles (tile_px, tile_px, 3) of a PIL image in row-major order, edges padded white."""
    w, h = image.size
    for y in range(0, h, tile_px):
        strip = np.asarray(image.crop((0, y, w, min(h, y + tile_px))))  # (rows, w, 3)
        yield from _strip_tiles(strip, tile_px)


def _strip_tiles(strip: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    rows, w = strip.shape[:2]
    for x in range(0, w, tile_px):
        tile = strip[:, x : x + tile_px]
        if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
            padded = np.full((tile_px, tile_px, 3), 255, np.uint8)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            tile = padded
        yield tile


def _write_tiff(path: Path, spec: SyntheticSpec, canvas: Image.Image) -> None:
    """Write the pyramid, one page per level, every level streamed tile row by tile row."""
    shapes = pyramid_shapes(spec.width_px, spec.height_px)
    canvas_level = int(round(math.log2(CANVAS_DOWNSAMPLE)))
    bigtiff = spec.width_px * spec.height_px * 3 > 2**31
    description = "slidetrain synthetic WSI " + json.dumps(spec.to_dict(), sort_keys=True)
    lower = canvas
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, (h, w) in enumerate(shapes):
            mpp_level = spec.mpp * 2**level
            if level < canvas_level:
                grain = _grain(spec.seed, spec.tile_px, w) if level == 0 else None
                tiles = _upsampled_tiles(canvas, (h, w), 2 ** (canvas_level - level), spec.tile_px, grain)
            else:
                if level > canvas_level:
                    lower = lower.reduce(2)  # 2x2 box average, odd sides rounded up
                if lower.size != (w, h):
                    raise AssertionError(f"level {level} is {lower.size}, expected {(w, h)}")
                tiles = _image_tiles(lower, spec.tile_px)
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(spec.tile_px, spec.tile_px),
                photometric="rgb",  # tifffile stores JPEG as YCbCr, which OpenSlide decodes
                compression="jpeg",
                compressionargs={"level": spec.jpeg_quality},
                resolution=(1e4 / mpp_level, 1e4 / mpp_level),  # px per cm -> openslide.mpp-x
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,  # reduced-resolution image
                metadata=None,
                description=description if level == 0 else None,
                maxworkers=1,
            )


def write_synthetic_slide(
    path: str | os.PathLike, spec: SyntheticSpec, truth_path: str | os.PathLike | None = None
) -> None:
    """Draw `spec` and write it as a pyramidal JPEG TIFF at `path` (+ ground truth npz).

    Both files appear only when complete (atomic rename); the truth file is
    renamed first, so an existing slide always has its truth beside it.
    """
    layout = _layout(spec)
    canvas = _render_canvas_image(spec, layout)
    with atomic_path(path) as tmp_slide:
        _write_tiff(tmp_slide, spec, canvas)
        if truth_path is not None:
            with atomic_path(truth_path) as tmp_truth, open(tmp_truth, "wb") as fh:
                np.savez_compressed(
                    fh,
                    tissue=layout.tissue,
                    lesion=layout.lesion_grade > 0,
                    lesion_grade=layout.lesion_grade,
                    pen=layout.pen,
                    debris=layout.debris,
                    artifact=layout.pen | layout.debris,
                    downsample=np.float64(TRUTH_DOWNSAMPLE),
                    spec=np.array(json.dumps(spec.to_dict(), sort_keys=True)),
                )


def read_truth(truth_path: str | os.PathLike) -> dict[str, Any]:
    """Ground truth of a synthetic slide on the downsample-16 grid.

    Keys: tissue, lesion, artifact (= pen | debris), pen, debris: bool (h, w);
    lesion_grade: uint8 (h, w) with 0 none, 1 low, 2 high; downsample: float
    (level-0 px per grid px); spec: dict (SyntheticSpec.from_dict rebuilds it).
    """
    with np.load(truth_path, allow_pickle=False) as z:
        out: dict[str, Any] = {k: z[k].astype(bool) for k in ("tissue", "lesion", "artifact", "pen", "debris")}
        out["lesion_grade"] = z["lesion_grade"].astype(np.uint8)
        out["downsample"] = float(z["downsample"])
        out["spec"] = json.loads(str(z["spec"]))
    return out
