"""Figures people would rather look at than read: where the best attention model looked.

`attention_figure`: for one test slide per class, the 5x slide image, the
per-tile attention of the best attention method (highest mean test AUROC in
Table 1) drawn over it, and the ground-truth lesions where the dataset has
them (synthetic slides do; real slides show the image only). The drawn attention, one row per
tile of each shown slide (ATTENTION_DATA_COLUMNS), goes to a CSV beside the PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from slidetrain.io import atomic_path  # noqa: E402
from slidetrain.paper.figure_data import data_path_for  # noqa: E402

#: the attention figure's data: per shown slide and tile, its level-0 corner and the attention drawn (/ max)
ATTENTION_DATA_COLUMNS = ["method", "slide_id", "truth", "predicted", "tile_x_level0", "tile_y_level0", "attention"]


def best_attention_method(table1_csv: Path, dataset: str, attention_methods: list[str]) -> str:
    table = pd.read_csv(table1_csv)
    table = table[(table.dataset == dataset) & table.method.isin(attention_methods)].copy()
    table["auroc"] = pd.to_numeric(table.auroc, errors="coerce")
    if table.auroc.notna().sum() == 0:
        raise ValueError(f"Table 1 has no attention method with an AUROC for dataset {dataset!r}")
    return str(table.sort_values("auroc", ascending=False).method.iloc[0])


def tile_heatmap(
    scores: np.ndarray, coords: np.ndarray, tile_level0: int, meta: dict, shape: tuple[int, int]
) -> np.ndarray:
    """Per-tile scores painted onto the 5x image grid: (H, W) float, NaN where no tile."""
    heat = np.full(shape, np.nan, np.float32)
    x0, y0 = meta["level0_bbox"][:2]
    ds = float(meta["downsample"])
    size = max(1, int(round(tile_level0 / ds)))
    for (x, y), s in zip(coords, scores, strict=True):
        c, r = int((x - x0) / ds), int((y - y0) / ds)
        heat[max(r, 0) : max(r + size, 0), max(c, 0) : max(c + size, 0)] = s
    return heat


def attention_figure(
    dataset: str,
    table1_csv: Path,
    runs_dir: Path,
    images_dir: Path,
    tiles_dir: Path,
    truth_dir: Path | None,
    class_names: list[str],
    attention_methods: list[str],
    out_png: Path,
    split: str = "mccv0",
    seed: str = "0",
    out_data: Path | None = None,
) -> str:
    method = best_attention_method(table1_csv, dataset, attention_methods)
    drawn = []  # one frame of ATTENTION_DATA_COLUMNS per shown slide
    run = Path(runs_dir) / method / split / seed
    pred = pd.read_csv(run / "predictions.csv")
    picks = []
    for c in class_names:  # the most confident correct slide of each class, else the first of it
        rows = pred[pred.label == c].sort_values(f"prob_{c}", ascending=False)
        if len(rows):
            picks.append((c, rows.slide_id.iloc[0]))
    n_cols = 3 if truth_dir is not None else 2
    fig, axes = plt.subplots(len(picks), n_cols, figsize=(4.2 * n_cols, 3.4 * len(picks)), squeeze=False)
    with h5py.File(run / "attention.h5", "r") as att:
        for row, (label, slide_id) in enumerate(picks):
            image = np.asarray(Image.open(Path(images_dir) / f"{slide_id}.jpg"))  # (H, W, 3)
            meta = json.loads((Path(images_dir) / f"{slide_id}.json").read_text())
            scores = att[slide_id]["attention"][:]
            if scores.ndim == 2:  # one branch per class: show the true class's branch
                scores = scores[class_names.index(label)]
            coords = att[slide_id]["coords"][:]
            with h5py.File(Path(tiles_dir) / f"{slide_id}.h5", "r") as t:
                tile_level0 = int(t["coords"].attrs["patch_size_level0"])
            shown_scores = scores / max(scores.max(), 1e-12)  # (N,)
            heat = tile_heatmap(shown_scores, coords, tile_level0, meta, image.shape[:2])
            p = pred[pred.slide_id == slide_id].iloc[0]
            drawn.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "slide_id": slide_id,
                        "truth": label,
                        "predicted": p.predicted,
                        "tile_x_level0": coords[:, 0],
                        "tile_y_level0": coords[:, 1],
                        "attention": shown_scores,
                    },
                    columns=ATTENTION_DATA_COLUMNS,
                )
            )
            axes[row, 0].imshow(image)
            axes[row, 0].set_title(f"{slide_id}  truth: {label}", fontsize=9)
            axes[row, 1].imshow(image)
            shown = axes[row, 1].imshow(np.ma.masked_invalid(heat), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            axes[row, 1].set_title(
                f"{method} attention  predicted: {p.predicted} ({p[f'prob_{p.predicted}']:.2f})", fontsize=9
            )
            fig.colorbar(shown, ax=axes[row, 1], fraction=0.03)
            if truth_dir is not None:
                truth = np.load(Path(truth_dir) / f"{slide_id}.truth.npz")
                lesion = truth["lesion"]  # (h, w) at truth downsample, level 0 = whole slide
                tds = float(truth["downsample"])
                x0, y0, x1, y1 = meta["level0_bbox"]
                crop = lesion[int(y0 / tds) : int(np.ceil(y1 / tds)), int(x0 / tds) : int(np.ceil(x1 / tds))]
                crop = (
                    np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize(image.shape[1::-1], Image.NEAREST))
                    > 0
                )
                axes[row, 2].imshow(image)
                axes[row, 2].imshow(np.ma.masked_where(~crop, crop), cmap="cool", alpha=0.55, vmin=0, vmax=1)
                axes[row, 2].set_title(f"ground-truth lesions ({crop.mean():.1%} of box)", fontsize=9)
            for ax in axes[row]:
                ax.set_axis_off()
    fig.suptitle(f"{dataset}: where {method} looked (test slides of split {split}, seed {seed})", fontsize=11)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    data = pd.concat(drawn, ignore_index=True) if drawn else pd.DataFrame(columns=ATTENTION_DATA_COLUMNS)
    with atomic_path(out_data or data_path_for(out_png)) as tmp:
        data.to_csv(tmp, index=False)
    return method
