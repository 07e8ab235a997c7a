"""Per-slide heatmaps: a run's per-tile attention (or score) over the slide's thumbnail.

For each slide: results/{dataset}/heatmaps/{method}/{slide}.png (thumbnail, per-tile values,
tissue-mask outline and, for synthetic slides, the lesion-truth outline) and {slide}.csv (the
values plotted, one row per tile, with the share of the tile that is lesion where truth exists),
plus index.csv over the slides (what Snakemake tracks). Memory is bounded by the thumbnail: the
slide is read strip by strip (wsi.thumbnail), masks and truth are small grids.

    slidetrain heatmap --attention results/synthetic/runs/abmil/mccv0/0/attention.h5 --method abmil \
        --split results/synthetic/splits/mccv0.csv --sheet config/sheets/synthetic.tsv \
        --slides-dir resources/synthetic/slides --tiles-dir results/synthetic/tiles \
        --masks-dir results/synthetic/masks --truth-dir resources/synthetic/slides \
        --out-dir results/synthetic/heatmaps/abmil
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from slidetrain.errors import SlideError  # noqa: E402
from slidetrain.io import atomic_path  # noqa: E402
from slidetrain.wsi.mask import read_mask_png  # noqa: E402
from slidetrain.wsi.thumbnail import Thumbnail, grid_on_thumbnail, read_thumbnail  # noqa: E402
from slidetrain.wsi.tile import read_tiles_h5  # noqa: E402

TILE_COLUMNS = (
    "slide_id",
    "method",
    "x_level0",
    "y_level0",
    "tile_px_level0",
    "value",
    "value_scaled",
    "lesion_fraction",
)
INDEX_COLUMNS = (
    "slide_id",
    "method",
    "png",
    "csv",
    "n_tiles",
    "branch",
    "label",
    "predicted",
    "seconds",
    "lesion_auroc",
    "scaled_on_lesion",
    "scaled_off_lesion",
)
LESION_TILE = 0.5  # a tile counts as lesion when at least this share of it is lesion in the truth


@dataclass(frozen=True)
class SlideInputs:
    """Where one slide's pieces live (per-slide paths, as the pipeline writes them)."""

    slide_id: str
    slide_path: Path
    tiles_h5: Path
    mask_png: Path
    truth_npz: Path | None  # synthetic slides only


def read_tile_scores(
    attention_h5: Path, slide_id: str, branch: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(values (N,), level-0 coords (N, 2), number of branches) of one slide from a run's attention.h5.

    Multi-branch attention (C, N) (CLAM-MB, DSMIL) needs `branch`, the class whose branch is shown;
    single-branch attention ignores it.
    """
    attention_h5 = Path(attention_h5)
    if not attention_h5.is_file():
        raise SlideError(
            slide_id,
            f"attention file {attention_h5} does not exist; expected the run's evaluation"
            " output (attention.h5 with one group per test slide)",
        )
    with h5py.File(attention_h5, "r") as f:
        if slide_id not in f:
            have = sorted(f.keys())
            raise SlideError(
                slide_id,
                f"has no group in {attention_h5} (it holds {len(have)} slides, e.g."
                f" {have[:3]}); expected the slide's per-tile attention there",
            )
        group = f[slide_id]
        for key in ("attention", "coords"):
            if key not in group:
                raise SlideError(slide_id, f"{attention_h5}: group lacks {key!r}; expected 'attention' and 'coords'")
        values = np.asarray(group["attention"][:], np.float64)  # (N,) or (C, N)
        coords = np.asarray(group["coords"][:], np.int64).reshape(-1, 2)  # (N, 2)
    n_branches = values.shape[0] if values.ndim == 2 else 1
    if values.ndim == 2:
        if branch is None or not 0 <= branch < values.shape[0]:
            raise SlideError(
                slide_id,
                f"{attention_h5}: attention has {values.shape[0]} branches; expected a"
                f" branch index in [0, {values.shape[0]}), got {branch}",
            )
        values = values[branch]
    if values.ndim != 1 or len(values) != len(coords):
        raise SlideError(
            slide_id,
            f"{attention_h5}: {values.shape} attention values for {len(coords)} tiles; expected one value per tile",
        )
    if len(values) == 0 or not np.isfinite(values).all():
        raise SlideError(slide_id, f"{attention_h5}: attention is empty or not finite; expected finite values")
    return values, coords, n_branches


def scale_values(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] within the slide (attention is relative within a bag); constant -> 0.5."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return np.full_like(values, 0.5, dtype=np.float64)
    return (values - lo) / (hi - lo)


def box_fraction(grid: np.ndarray, grid_downsample: float, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """Share of each level-0 square (x, y, size) that is True on `grid`: (N,) float, via an integral image."""
    # int32 holds the count of a 46,000 x 46,000 grid; half the memory and time of int64
    integral = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), np.int32)
    integral[1:, 1:] = grid.astype(np.int32).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    h, w = grid.shape
    c0 = np.clip(np.floor(coords[:, 0] / grid_downsample).astype(np.int64), 0, w)
    r0 = np.clip(np.floor(coords[:, 1] / grid_downsample).astype(np.int64), 0, h)
    c1 = np.clip(np.ceil((coords[:, 0] + size_level0) / grid_downsample).astype(np.int64), 0, w)
    r1 = np.clip(np.ceil((coords[:, 1] + size_level0) / grid_downsample).astype(np.int64), 0, h)
    total = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = np.maximum((r1 - r0) * (c1 - c0), 1)
    return total / area


def paint_tiles(scaled: np.ndarray, coords: np.ndarray, size_level0: int, thumb: Thumbnail) -> np.ndarray:
    """Per-tile values on the thumbnail's pixels: (h, w) float, NaN where no tile (overlaps keep the max)."""
    th, tw = thumb.rgb.shape[:2]
    dx, dy = thumb.downsample_xy
    heat = np.full((th, tw), np.nan)
    c0 = np.floor(coords[:, 0] / dx).astype(np.int64)
    r0 = np.floor(coords[:, 1] / dy).astype(np.int64)
    c1 = np.maximum(np.ceil((coords[:, 0] + size_level0) / dx).astype(np.int64), c0 + 1)  # >= 1 px per tile
    r1 = np.maximum(np.ceil((coords[:, 1] + size_level0) / dy).astype(np.int64), r0 + 1)
    for v, a, b, c, d in zip(scaled, r0, r1, c0, c1, strict=True):
        heat[max(a, 0) : max(b, 0), max(c, 0) : max(d, 0)] = np.fmax(
            heat[max(a, 0) : max(b, 0), max(c, 0) : max(d, 0)], v
        )
    return heat


def lesion_auroc(values: np.ndarray, is_lesion: np.ndarray) -> float:
    """AUROC of the per-tile value for telling lesion tiles from the rest (NaN without both kinds)."""
    n_pos, n_neg = int(is_lesion.sum()), int((~is_lesion).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(values).rank(method="average").to_numpy()  # Mann-Whitney U with ties averaged
    return float((ranks[is_lesion].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _outline(ax, grid: np.ndarray, color: str, style: str, width: float) -> None:
    if grid.any() and not grid.all():
        ax.contour(grid.astype(np.float32), levels=[0.5], colors=[color], linestyles=[style], linewidths=[width])


def render_heatmap_png(
    out_png: Path, thumb: Thumbnail, heat: np.ndarray, tissue: np.ndarray, lesion: np.ndarray | None, title: str
) -> None:
    th, tw = thumb.rgb.shape[:2]
    dpi = 100
    fig, ax = plt.subplots(figsize=(tw / dpi + 1.4, th / dpi + 0.7), dpi=dpi)
    ax.imshow(thumb.rgb, interpolation="nearest")
    shown = ax.imshow(
        np.ma.masked_invalid(heat), cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    _outline(ax, tissue, "deepskyblue", "dashed", 0.9)
    handles = [Line2D([], [], color="deepskyblue", linestyle="dashed", label="tissue mask")]
    if lesion is not None:
        _outline(ax, lesion, "lime", "solid", 1.4)
        handles.append(Line2D([], [], color="lime", label="lesion truth"))
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
    fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.01, label="per-tile value (min-max in slide)")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    # fixed margins, not tight_layout (a second full draw); zlib level 3: a third of the encoding time
    # (0.95 in on the right for the colourbar's ticks and label, 0.35 in on top for the title)
    fig.subplots_adjust(left=0.01, right=1 - 0.95 / fig.get_figwidth(), bottom=0.01, top=1 - 0.35 / fig.get_figheight())
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": 3})
    plt.close(fig)


def slide_heatmap(
    inputs: SlideInputs,
    attention_h5: Path,
    method: str,
    out_png: Path,
    out_csv: Path,
    branch: int | None = None,
    title_extra: str = "",
    max_px: int = 1024,
    mpp_fallback: float | None = None,
) -> dict:
    """Write one slide's PNG and per-tile CSV; return its index row (without png/csv paths)."""
    t0 = time.perf_counter()
    sid = inputs.slide_id
    values, coords, n_branches = read_tile_scores(attention_h5, sid, branch)  # (N,), (N, 2)
    if not inputs.tiles_h5.is_file():
        raise SlideError(sid, f"tile coordinates {inputs.tiles_h5} not found; expected the preprocess output")
    _, tile_attrs = read_tiles_h5(inputs.tiles_h5)
    size0 = int(tile_attrs["patch_size_level0"])
    if not inputs.mask_png.is_file():
        raise SlideError(sid, f"tissue mask {inputs.mask_png} not found; expected the preprocess output")
    mask = read_mask_png(inputs.mask_png)
    thumb = read_thumbnail(inputs.slide_path, sid, max_px=max_px, mpp_fallback=mpp_fallback)
    scaled = scale_values(values)
    heat = paint_tiles(scaled, coords, size0, thumb)  # (h, w)
    tissue = grid_on_thumbnail(mask.mask, mask.downsample_xy, thumb)
    lesion_px, lesion_frac = None, np.full(len(values), np.nan)
    if inputs.truth_npz is not None:
        if not inputs.truth_npz.is_file():
            raise SlideError(
                sid, f"lesion truth {inputs.truth_npz} not found; expected the synthetic slide's .truth.npz beside it"
            )
        with np.load(inputs.truth_npz, allow_pickle=False) as z:
            lesion_grid, tds = z["lesion"].astype(bool), float(z["downsample"])  # (h16, w16) level-0 / 16
        lesion_px = grid_on_thumbnail(lesion_grid, (tds, tds), thumb)
        lesion_frac = box_fraction(lesion_grid, tds, coords, size0)
    is_lesion = lesion_frac >= LESION_TILE
    table = pd.DataFrame(
        {
            "slide_id": sid,
            "method": method,
            "x_level0": coords[:, 0],
            "y_level0": coords[:, 1],
            "tile_px_level0": size0,
            "value": values,
            "value_scaled": scaled,
            "lesion_fraction": lesion_frac,
        }
    )
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    title = f"{sid}  {method}  ({len(values)} tiles{title_extra})"
    render_heatmap_png(out_png, thumb, heat, tissue, lesion_px, title)
    has_truth = inputs.truth_npz is not None
    return {
        "slide_id": sid,
        "method": method,
        "n_tiles": len(values),
        "n_branches": n_branches,
        "lesion_auroc": lesion_auroc(values, is_lesion) if has_truth else float("nan"),
        "scaled_on_lesion": float(scaled[is_lesion].mean()) if has_truth and is_lesion.any() else float("nan"),
        "scaled_off_lesion": float(scaled[~is_lesion].mean()) if has_truth and (~is_lesion).any() else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
