"""`slidetrain heatmap` and `slidetrain heatmap-gallery` (registered by slidetrain.wsi.commands)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_heatmap(a: argparse.Namespace) -> None:
    from slidetrain.wsi.heatmap_run import heatmaps_for_run

    out_dir = Path(a.out_dir)
    heatmaps_for_run(
        Path(a.attention),
        a.method,
        Path(a.split),
        Path(a.sheet),
        Path(a.slides_dir),
        Path(a.tiles_dir),
        Path(a.masks_dir),
        out_dir,
        Path(a.index) if a.index else out_dir / "index.csv",
        predictions_csv=Path(a.predictions) if a.predictions else None,
        class_names=a.classes,
        truth_dir=Path(a.truth_dir) if a.truth_dir else None,
        max_px=a.max_px,
        mpp_fallback=a.mpp_fallback,
    )


def cmd_heatmap_gallery(a: argparse.Namespace) -> None:
    from slidetrain.wsi.heatmap_run import write_gallery

    write_gallery([Path(p) for p in a.indexes], Path(a.out), a.title)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("heatmap", help="per-slide heatmaps (PNG + per-tile CSV) of a run's attention over thumbnails")
    s.add_argument("--attention", required=True, help="the run's attention.h5")
    s.add_argument("--method", required=True, help="name shown in titles and the tables")
    s.add_argument("--split", required=True, help="split CSV: heatmaps of every slide of its test part")
    s.add_argument("--sheet", required=True, help="slide sheet (slide_id, source)")
    s.add_argument("--slides-dir", required=True, help="folder of the pipeline-drawn (synthetic) slides")
    s.add_argument("--tiles-dir", required=True, help="results/{dataset}/tiles")
    s.add_argument("--masks-dir", required=True, help="results/{dataset}/masks ({slide}.mask.png)")
    s.add_argument("--truth-dir", help="folder of {slide}.truth.npz (synthetic slides): lesion outlines")
    s.add_argument("--predictions", help="the run's predictions.csv: titles, and the branch of multi-branch attention")
    s.add_argument("--classes", nargs="+", help="class names in label-index order (multi-branch attention)")
    s.add_argument("--max-px", type=int, default=1024, help="long side of the thumbnail")
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--out-dir", required=True, help="results/{dataset}/heatmaps/{method}")
    s.add_argument("--index", help="index CSV (default: OUT_DIR/index.csv)")
    s.set_defaults(func=cmd_heatmap)

    g = sub.add_parser("heatmap-gallery", help="one HTML page of heatmaps over methods (report gallery)")
    g.add_argument("--indexes", nargs="+", required=True, help="index.csv of each method's heatmaps")
    g.add_argument("--title", default="Heatmaps")
    g.add_argument("--out", required=True, help="HTML")
    g.set_defaults(func=cmd_heatmap_gallery)
