"""Frozen tile features, cached per slide and encoder.

One job extracts a shard of slides with the encoder loaded once (loading torch
and the model costs more than a small slide's tiles), and skips slides whose
feature file is already complete, so a killed job resumes where it stopped.
Output per slide: h5 with `features` (N, D) float32 and `coords` (N, 2), the
layout CLAM uses, so either side can read the other's files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from tqdm import tqdm

from slidetrain.io import atomic_path
from slidetrain.models.encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoder
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.tile import read_tiles, read_tiles_h5

if TYPE_CHECKING:  # pandas costs 0.2 s to import; per-slide jobs do not need it
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class FeatureJob:
    slide_id: str
    slide_path: Path
    tiles_h5: Path
    out_h5: Path


def is_complete(path: Path) -> bool:
    """A feature file is complete when it opens and carries the completion flag written last."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


@torch.no_grad()
def embed_tiles(
    encoder: torch.nn.Module, tiles: Iterable[np.ndarray], batch_size: int, device: torch.device
) -> np.ndarray:
    """Features (N, D) float32 of RGB uint8 tiles (T, T, 3): ImageNet-normalised batches of `batch_size`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    feats: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, T, T)
        feats.append(encoder((x - mean) / std).float().cpu().numpy())  # (B, D)
        batch.clear()

    for tile in tiles:
        batch.append(tile)  # (T, T, 3) uint8
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    features = np.concatenate(feats) if feats else np.zeros((0, getattr(encoder, "dim", 0)), np.float32)
    return features.astype(np.float32, copy=False)


@torch.no_grad()
def embed_slide(
    encoder: torch.nn.Module, job: FeatureJob, batch_size: int, device: torch.device, mpp_fallback: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Features (N, D) and coords (N, 2) of one slide's tiles; also seconds spent."""
    t0 = time.perf_counter()
    coords, attrs = read_tiles_h5(job.tiles_h5)
    if "excluded" in attrs or len(coords) == 0:  # excluded slide: an empty, flagged feature file
        return np.zeros((0, getattr(encoder, "dim", 0)), np.float32), coords, 0.0
    with open_slide(job.slide_path, job.slide_id, mpp_fallback) as slide:
        tiles = read_tiles(slide, coords, float(attrs["target_magnification"]), int(attrs["patch_size"]))
        features = embed_tiles(encoder, tiles, batch_size, device)
    return features, coords, time.perf_counter() - t0


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["complete"] = True


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2))."""
    with h5py.File(path, "r") as f:
        if not f.attrs.get("complete", False):
            raise OSError(f"{path}: feature file is incomplete (extraction was interrupted); delete it and rerun")
        return f["features"][:], f["coords"][:]


def extract_features(
    jobs: list[FeatureJob],
    encoder_name: str,
    weights: str = "none",
    batch_size: int = 64,
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    mpp_fallback: float | None = None,
) -> list[dict]:
    """Extract features for every job not already complete; returns per-slide timing rows."""
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    todo = [j for j in jobs if not is_complete(j.out_h5)]
    log.info("features %s: %d slides, %d already done", encoder_name, len(jobs), len(jobs) - len(todo))
    rows: list[dict] = []
    if todo:
        encoder = build_encoder(encoder_name, weights, seed).to(dev)
        for job in tqdm(todo, desc=f"features {encoder_name}", unit="slide"):
            features, coords, seconds = embed_slide(encoder, job, batch_size, dev, mpp_fallback)
            write_features(
                job.out_h5, features, coords,
                {"encoder": encoder_name, "weights": weights, "slide_id": job.slide_id, "seconds": seconds},
            )
            rows.append({"slide_id": job.slide_id, "features_s": seconds, "n_tiles": len(coords)})
            log.info("%s: %d tiles in %.2f s", job.slide_id, len(coords), seconds)
    return rows


def write_feature_index(feature_files: list[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """features/{encoder}/index.csv: slide_id, n_tiles, dim, excluded — what training jobs depend on.

    One index per dataset keeps the DAG small (a training job lists one file,
    not one per slide) and fails here, naming the slide, if a file is incomplete.
    """
    import pandas as pd

    rows = []
    for path in feature_files:
        path = Path(path)
        if not is_complete(path):
            raise OSError(f"slide {path.stem}: feature file {path} is incomplete; delete it and rerun")
        with h5py.File(path, "r") as f:
            n, dim = f["features"].shape
        rows.append({"slide_id": path.stem, "n_tiles": n, "dim": dim, "empty": n == 0})
    table = pd.DataFrame(rows, columns=["slide_id", "n_tiles", "dim", "empty"])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
