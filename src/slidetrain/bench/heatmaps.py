"""Heatmap cost per slide: seconds and peak RSS, on a run's test slides and on one large synthetic slide.

Each slide is drawn in a fresh process (so its peak RSS is its own, not the largest slide's so
far); the row records the wall and CPU seconds of the heatmap call alone, the process's RSS after
its imports and its peak RSS. The large slide (40,960 x 30,720 by default, drawn with the project's synthetic
writer) has no trained model: its mask and tiles are made here (untimed) and its per-tile values
are a stand-in (the tile's lesion share plus seeded noise), which costs the drawing the same.

    slidetrain bench-heatmaps --attention results/synthetic/runs/abmil/mccv0/0/attention.h5 --method abmil \
        --split results/synthetic/splits/mccv0.csv --sheet config/sheets/synthetic.tsv \
        --slides-dir resources/synthetic/slides --tiles-dir results/synthetic/tiles \
        --masks-dir results/synthetic/masks --truth-dir resources/synthetic/slides \
        --large-slide resources/bench/heatmap_large.tiff --work-dir results/bench/heatmaps_work \
        --out results/bench/heatmaps.csv
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from slidetrain.docs.benchmarks import cpu_model
from slidetrain.errors import SlidetrainError
from slidetrain.io import atomic_path  # light: `slidetrain --help` imports this module

COLUMNS = (
    "slide_id",
    "kind",
    "method",
    "slide_w",
    "slide_h",
    "n_tiles",
    "thumbnail_px",
    "seconds",
    "cpu_seconds",
    "import_rss_mb",
    "peak_rss_mb",
    "cpu",
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_one(job: dict) -> dict:
    """In this (fresh) process: one slide's heatmap; seconds of the call, RSS after imports, peak RSS."""
    import time

    from slidetrain.wsi.heatmaps import SlideInputs, slide_heatmap

    import_rss = _rss_mb()
    cpu0 = time.process_time()  # CPU seconds too: on a shared machine wall seconds include waiting for a core
    truth = Path(job["truth_npz"]) if job.get("truth_npz") else None
    inputs = SlideInputs(job["slide_id"], Path(job["slide_path"]), Path(job["tiles_h5"]), Path(job["mask_png"]), truth)
    row = slide_heatmap(
        inputs,
        Path(job["attention_h5"]),
        job["method"],
        Path(job["out_png"]),
        Path(job["out_csv"]),
        max_px=int(job["max_px"]),
    )
    return {
        "seconds": row["seconds"],
        "cpu_seconds": time.process_time() - cpu0,
        "n_tiles": row["n_tiles"],
        "import_rss_mb": import_rss,
        "peak_rss_mb": _rss_mb(),
    }


def _in_fresh_process(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "slidetrain.bench.heatmaps", json.dumps(job)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SlidetrainError(f"bench-heatmaps: slide {job['slide_id']} failed in its process:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_large_slide(
    slide_path: Path, truth_npz: Path | None, work_dir: Path, tile_px: int, target_magnification: float, seed: int = 0
) -> dict:
    """Mask, tiles and stand-in attention of a slide no model scored (untimed inputs of the heatmap)."""
    import h5py
    import numpy as np

    from slidetrain.wsi.heatmaps import box_fraction
    from slidetrain.wsi.mask import mask_params, segment_tissue, write_mask_png
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import patch_size_level0, tile_coordinates, write_tiles_h5

    sid = slide_path.name.split(".")[0]
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "mask_png": work_dir / f"{sid}.mask.png",
        "tiles_h5": work_dir / f"{sid}.h5",
        "attention_h5": work_dir / f"{sid}.attention.h5",
    }
    with open_slide(slide_path, slide_id=sid) as slide:
        tissue = segment_tissue(slide, mask_params("default"))
        coords = tile_coordinates(slide, tissue, target_magnification, tile_px, 0, 0.5)  # (N, 2)
        write_mask_png(paths["mask_png"], tissue)
        write_tiles_h5(
            paths["tiles_h5"],
            coords,
            slide=slide,
            target_magnification=target_magnification,
            tile_px=tile_px,
            overlap_px=0,
        )
        size0 = patch_size_level0(slide, target_magnification, tile_px)
    values = np.random.default_rng(seed).random(len(coords)) * 0.2
    if truth_npz is not None:
        with np.load(truth_npz, allow_pickle=False) as z:
            values += box_fraction(z["lesion"].astype(bool), float(z["downsample"]), coords, size0)
    with atomic_path(paths["attention_h5"]) as tmp, h5py.File(tmp, "w") as f:
        g = f.create_group(sid)
        g.create_dataset("attention", data=values)  # (N,) stand-in values
        g.create_dataset("coords", data=coords)
    return {
        "slide_id": sid,
        "slide_path": str(slide_path),
        "truth_npz": str(truth_npz) if truth_npz else "",
        **{k: str(v) for k, v in paths.items()},
    }


def bench_heatmaps(a: argparse.Namespace) -> None:
    import pandas as pd

    from slidetrain.wsi.heatmap_run import sheet_slide_paths, test_slides
    from slidetrain.wsi.slide import open_slide

    work = Path(a.work_dir)
    jobs = []
    paths = sheet_slide_paths(Path(a.sheet), Path(a.slides_dir))
    for sid in test_slides(Path(a.split)):
        slide_path, drawn = paths[sid]
        truth = Path(a.truth_dir) / f"{sid}.truth.npz" if a.truth_dir and drawn else None
        jobs.append(
            (
                "default",
                {
                    "slide_id": sid,
                    "slide_path": str(slide_path),
                    "truth_npz": str(truth or ""),
                    "tiles_h5": str(Path(a.tiles_dir) / f"{sid}.h5"),
                    "mask_png": str(Path(a.masks_dir) / f"{sid}.mask.png"),
                    "attention_h5": a.attention,
                    "method": a.method,
                },
            )
        )
    if a.large_slide:
        large = Path(a.large_slide)
        truth = large.with_name(large.name.split(".")[0] + ".truth.npz")
        job = prepare_large_slide(large, truth if truth.is_file() else None, work, a.tile_px, a.target_magnification)
        jobs.append(("large", {**job, "method": "stand-in"}))
    rows = []
    for kind, job in jobs:
        job.update(
            out_png=str(work / "png" / f"{job['slide_id']}.png"),
            out_csv=str(work / "png" / f"{job['slide_id']}.csv"),
            max_px=a.max_px,
        )
        timed = _in_fresh_process(job)
        with open_slide(job["slide_path"], slide_id=job["slide_id"]) as slide:
            w, h = slide.dimensions
        rows.append(
            {
                "slide_id": job["slide_id"],
                "kind": kind,
                "method": job["method"],
                "slide_w": w,
                "slide_h": h,
                "n_tiles": timed["n_tiles"],
                "thumbnail_px": a.max_px,
                "seconds": timed["seconds"],
                "cpu_seconds": timed["cpu_seconds"],
                "import_rss_mb": timed["import_rss_mb"],
                "peak_rss_mb": timed["peak_rss_mb"],
                "cpu": cpu_model(),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)[list(COLUMNS)]
    with atomic_path(a.out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4g")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("bench-heatmaps", help="seconds and peak RSS of a heatmap per slide (fresh process each)")
    for name, what in (
        ("attention", "a run's attention.h5"),
        ("method", "its method"),
        ("split", "split CSV (its test slides are timed)"),
        ("sheet", "slide sheet"),
        ("slides-dir", "pipeline-drawn slides"),
        ("tiles-dir", "results/{dataset}/tiles"),
        ("masks-dir", "results/{dataset}/masks"),
        ("work-dir", "large slide's inputs, the PNGs"),
        ("out", "CSV"),
    ):
        s.add_argument(f"--{name}", required=True, help=what)
    s.add_argument("--truth-dir", help="{slide}.truth.npz of synthetic slides")
    s.add_argument("--large-slide", help="a large synthetic slide (its .truth.npz beside it is used when present)")
    s.add_argument("--tile-px", type=int, default=128, help="large slide: tile size at the target magnification")
    s.add_argument("--target-magnification", type=float, default=5.0)
    s.add_argument("--max-px", type=int, default=1024)
    s.set_defaults(func=bench_heatmaps)


if __name__ == "__main__":  # one slide in this process: `python -m slidetrain.bench.heatmaps '<job json>'`
    print(json.dumps(time_one(json.loads(sys.argv[1]))))
