"""results/bench/features_throughput.csv: feature extraction of a shard end to end vs the encoder alone.

End to end = what a shard job does once started: read each slide's tile coordinates,
read and decode the tiles (in `workers` reader processes, or inline for 0), encode,
write the per-slide feature files. Model only = the same encoder on the same tiles,
already in memory as the same uint8 batches. Same process, device and threads, so
the ratio is the share of the encoder's speed that the pipeline keeps.

End to end runs twice per reader-process count: cold, every slide file and tile
coordinate file evicted from the page cache right before the run
(`bench.page_cache`; a real cohort of multi-GB slides is read cold, each slide
once), then warm, the same files still cached from the cold run. Both are in
the CSV (`ratio_cold`, `ratio_warm`); cold_cache_left is the largest share of a
file still cached after eviction (0 = cold; NaN where the kernel will not tell).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slidetrain.bench.page_cache import drop_and_measure
from slidetrain.io import atomic_path
from slidetrain.models.encoders import build_encoder
from slidetrain.wsi.encode import TileEncoder
from slidetrain.wsi.features import FeatureJob, extract_features
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.tile import read_tiles, read_tiles_h5

log = logging.getLogger(__name__)


def _batches_in_memory(jobs: list[FeatureJob], batch_size: int, mpp_fallback: float | None) -> list[torch.Tensor]:
    """Every tile of the shard as uint8 batches (B, T, T, 3), split per slide as the pipeline splits them."""
    batches = []
    for job in jobs:
        coords, attrs = read_tiles_h5(job.tiles_h5)
        if len(coords) == 0:
            continue
        with open_slide(job.slide_path, job.slide_id, mpp_fallback) as slide:
            tiles = np.stack(
                list(read_tiles(slide, coords, float(attrs["target_magnification"]), int(attrs["patch_size"])))
            )
        batches += [torch.from_numpy(tiles[a : a + batch_size]) for a in range(0, len(tiles), batch_size)]
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only_tiles_per_s(run: TileEncoder, batches: list[torch.Tensor]) -> float:
    """Tiles/s of the encoder over batches already in memory (host memory, as the loader hands them)."""
    _sync(run.device)
    t0 = time.perf_counter()
    outs = [run(b) for b in batches]
    torch.cat(outs).cpu()  # the pipeline also brings features back to the host
    _sync(run.device)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def end_to_end_tiles_per_s(
    jobs: list[FeatureJob],
    out_dir: Path,
    encoder_name: str,
    encoder: torch.nn.Module,
    batch_size: int,
    device: str,
    threads: int,
    seed: int,
    mpp_fallback: float | None,
    workers: int,
) -> float:
    """Tiles/s of one shard's feature extraction into the fresh `out_dir` (nothing to skip)."""
    runs = [FeatureJob(j.slide_id, j.slide_path, j.tiles_h5, out_dir / j.out_h5.name) for j in jobs]
    n_tiles = sum(len(read_tiles_h5(j.tiles_h5)[0]) for j in jobs)
    t0 = time.perf_counter()
    extract_features(
        runs, encoder_name, "none", batch_size, device, threads, seed, mpp_fallback, workers=workers, encoder=encoder
    )
    _sync(torch.device(device))
    return n_tiles / (time.perf_counter() - t0)


def bench_features_throughput(
    slides: list[tuple[str, str]],
    tiles_dir: Path,
    encoder_name: str,
    out_csv: str | Path,
    batch_size: int = 64,
    workers: list[int] = (0, 1),
    device: str = "cpu",
    threads: int = 1,
    mpp_fallback: float | None = None,
    seed: int = 0,
) -> list[dict]:
    import pandas as pd

    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    encoder = build_encoder(encoder_name, "none", seed)
    run = TileEncoder(encoder, dev)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        jobs = [FeatureJob(s, Path(p), tiles_dir / f"{s}.h5", Path(tmp) / "x" / f"{s}.h5") for s, p in slides]
        batches = _batches_in_memory(jobs, batch_size, mpp_fallback)
        n_tiles = sum(len(b) for b in batches)
        tile_px = int(batches[0].shape[1]) if batches else 0
        model_only_tiles_per_s(run, batches[:2])  # warm-up (allocator, kernels)
        rows = []
        args = (encoder_name, encoder, batch_size, device, threads, seed, mpp_fallback)
        for w in workers:
            model_only = model_only_tiles_per_s(run, batches)  # measured next to each end-to-end run
            cache_left = drop_and_measure([p for j in jobs for p in (j.slide_path, j.tiles_h5)])
            cold = end_to_end_tiles_per_s(jobs, Path(tmp) / f"cold{w}", *args, workers=w)
            warm = end_to_end_tiles_per_s(jobs, Path(tmp) / f"warm{w}", *args, workers=w)  # cached by cold
            rows.append(
                {
                    "device": str(dev),
                    "encoder": encoder_name,
                    "tile_px": tile_px,
                    "batch_size": batch_size,
                    "workers": w,
                    "tiles_per_s_model_only": round(model_only, 2),
                    "tiles_per_s_end_to_end_warm": round(warm, 2),
                    "ratio_warm": round(warm / model_only, 3),
                    "tiles_per_s_end_to_end_cold": round(cold, 2),
                    "ratio_cold": round(cold / model_only, 3),
                    "cold_cache_left": round(cache_left, 4),
                    "threads": threads,
                    "n_slides": len(jobs),
                    "n_tiles": n_tiles,
                }
            )
            log.info("workers %d: %.1f tiles/s end to end warm, %.1f cold, %.1f model only", w, warm, cold, model_only)
    table = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp_csv:
        table.to_csv(tmp_csv, index=False)
    return rows
