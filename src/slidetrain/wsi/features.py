"""Frozen tile features, cached per slide and encoder, extracted a shard of slides at a time.

One job extracts a shard of slides with the encoder loaded once (loading torch
and the model costs more than a small slide's tiles), and skips slides whose
feature file is complete and current (same encoder and weights, same tile
coordinates as the slide's tiles file), so a killed job resumes slide by slide.
Reading overlaps compute: DataLoader worker processes read and decode the next
batches (one batch = up to `batch_size` tiles of one slide, in shard order)
while the encoder runs; on CUDA batches are pinned, copied non-blocking, and
the encoder can run under AMP. Output per slide: h5 with `features` (N, D)
float32 and `coords` (N, 2), the layout CLAM uses, so either side can read the
other's files.

    slidetrain features --slides s1=/path/s1.svs --tiles-dir results/D/tiles \
        --out-dir results/D/features/resnet34 --encoder resnet34 --workers 2
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

from slidetrain.errors import ShardError
from slidetrain.io import atomic_path
from slidetrain.models.encoders import build_encoder
from slidetrain.wsi.encode import TileEncoder, encode_batches, tile_loader
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


def is_current(job: FeatureJob, coords: np.ndarray, encoder_name: str, weights: str) -> bool:
    """Complete, made by this encoder and weights, and of these tile coordinates (re-tiled slides redo)."""
    if not is_complete(job.out_h5):
        return False
    with h5py.File(job.out_h5, "r") as f:
        if f.attrs.get("encoder") != encoder_name or f.attrs.get("weights") != weights:
            return False
        return np.array_equal(f["coords"][:].reshape(-1, 2), coords)


@torch.no_grad()
def embed_tiles(
    encoder: torch.nn.Module, tiles: Iterable[np.ndarray], batch_size: int, device: torch.device
) -> np.ndarray:
    """Features (N, D) float32 of RGB uint8 tiles (T, T, 3): ImageNet-normalised batches of `batch_size`."""
    run = TileEncoder(encoder, device)
    feats: list[torch.Tensor] = []
    batch: list[np.ndarray] = []
    for tile in tiles:
        batch.append(tile)  # (T, T, 3) uint8
        if len(batch) == batch_size:
            feats.append(run(torch.from_numpy(np.stack(batch))))  # (B, D)
            batch.clear()
    if batch:
        feats.append(run(torch.from_numpy(np.stack(batch))))
    if not feats:
        return np.zeros((0, getattr(encoder, "dim", 0)), np.float32)
    return torch.cat(feats).cpu().numpy().astype(np.float32, copy=False)


@dataclass
class SlideTiles:
    """What a reader worker needs to read one slide's tiles (plain data: it is pickled to workers)."""

    slide_id: str
    slide_path: Path
    coords: np.ndarray  # (N, 2) level-0 top-left
    target_magnification: float
    tile_px: int
    mpp_fallback: float | None = None


class ShardTileBatches(torch.utils.data.Dataset):
    """Item i = the i-th batch of the shard: (slide index, uint8 tiles (B, T, T, 3), error text).

    Batches never straddle slides and come in shard order, so a slide's features
    are complete as soon as its last batch is encoded. A worker keeps its last
    slide open (consecutive items of one worker are mostly of one slide). A read
    error is returned, not raised, so the main process can name the slide (a
    DataLoader re-raises worker errors without their type).
    """

    def __init__(self, slides: list[SlideTiles], batch_size: int):
        self.slides = slides
        self.items = [
            (k, a, min(a + batch_size, len(s.coords)))
            for k, s in enumerate(slides)
            for a in range(0, len(s.coords), batch_size)
        ]
        self._open: tuple[int, object] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": None}

    def _slide(self, k: int):
        if self._open is None or self._open[0] != k:
            if self._open is not None:
                self._open[1].close()
            s = self.slides[k]
            self._open = (k, open_slide(s.slide_path, s.slide_id, s.mpp_fallback))
        return self._open[1]

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        k, a, b = self.items[i]
        s = self.slides[k]
        try:
            tiles = np.stack(list(read_tiles(self._slide(k), s.coords[a:b], s.target_magnification, s.tile_px)))
        except Exception as err:  # noqa: BLE001 - handed to the main process, which names the slide
            return k, None, f"{type(err).__name__}: {err}"
        return k, torch.from_numpy(tiles), ""  # (B, T, T, 3) uint8


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


def _pending_jobs(
    jobs: list[FeatureJob], encoder_name: str, weights: str, mpp_fallback: float | None
) -> tuple[dict[str, tuple[str, str]], list[tuple[FeatureJob, SlideTiles]]]:
    """({slide_id: (status, reason)} of every job from its tiles file, the jobs whose features are not
    current with their tiles to read)."""
    statuses: dict[str, tuple[str, str]] = {}
    todo: list[tuple[FeatureJob, SlideTiles]] = []
    for job in jobs:
        coords, attrs = read_tiles_h5(job.tiles_h5)
        if "excluded" in attrs:
            statuses[job.slide_id] = ("excluded", str(attrs["excluded"]))
        else:
            statuses[job.slide_id] = ("ok", "")
        if is_current(job, coords, encoder_name, weights):
            continue
        todo.append(
            (
                job,
                SlideTiles(
                    job.slide_id,
                    job.slide_path,
                    coords,
                    float(attrs.get("target_magnification", 0.0)),
                    int(attrs.get("patch_size", 0)),
                    mpp_fallback,
                ),
            )
        )
    return statuses, todo


def _write_features_manifest(
    manifest: str | Path, jobs: list[FeatureJob], statuses: dict[str, tuple[str, str]]
) -> None:
    """The shard's manifest: every job's status, reason and features file."""
    from slidetrain.data.shards import write_manifest

    write_manifest(
        manifest,
        [
            {
                "slide_id": j.slide_id,
                "status": statuses[j.slide_id][0],
                "reason": statuses[j.slide_id][1],
                "features": str(j.out_h5),
            }
            for j in jobs
        ],
        ["features"],
    )


def extract_features(
    jobs: list[FeatureJob],
    encoder_name: str,
    weights: str = "none",
    batch_size: int = 64,
    device: str = "cpu",
    threads: int = 1,
    seed: int = 0,
    mpp_fallback: float | None = None,
    workers: int = 0,
    amp: bool = False,
    shard: str = "-",
    manifest: str | Path | None = None,
    encoder: torch.nn.Module | None = None,
    sha256: str | None = None,
) -> list[dict]:
    """Extract features for every job not already current; returns per-slide timing rows of those.

    `encoder` (already built from `encoder_name` and `weights`) saves building it again (benchmarks).

    With `manifest`, also writes the shard's manifest (every job: status, reason, features file).
    A slide that cannot be read stops the shard with a ShardError naming it; its predecessors stay.
    """
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    statuses, todo = _pending_jobs(jobs, encoder_name, weights, mpp_fallback)
    log.info("features %s %s: %d slides, %d already done", encoder_name, shard, len(jobs), len(jobs) - len(todo))
    rows: list[dict] = []
    if todo:
        encoder = encoder if encoder is not None else build_encoder(encoder_name, weights, seed, sha256=sha256 or None)
        run = TileEncoder(encoder, dev, amp)
        attrs = {"encoder": encoder_name, "weights": weights}

        last_done = [time.perf_counter()]

        def finish(k: int, parts: list[torch.Tensor]) -> None:
            job, tiles = todo[k]
            dim = getattr(encoder, "dim", 0)
            features = torch.cat(parts).cpu().numpy() if parts else np.zeros((0, dim), np.float32)  # (N, D)
            # the slide's share of the pipeline's wall time: since the previous slide was finished
            now = time.perf_counter()
            seconds, last_done[0] = (now - last_done[0]) if parts else 0.0, now
            write_features(
                job.out_h5,
                features.astype(np.float32, copy=False),
                tiles.coords,
                {**attrs, "slide_id": job.slide_id, "seconds": seconds},
            )
            rows.append({"slide_id": job.slide_id, "features_s": seconds, "n_tiles": len(tiles.coords)})
            log.info("%s: %d tiles in %.2f s", job.slide_id, len(tiles.coords), seconds)

        dataset = ShardTileBatches([t for _, t in todo], batch_size)
        n_batches = [0] * len(todo)
        for k, _, _ in dataset.items:
            n_batches[k] += 1
        for k in range(len(todo)):
            if n_batches[k] == 0:  # no tiles (excluded slide): an empty, flagged feature file
                finish(k, [])
        total = sum(len(t.coords) for _, t in todo)
        parts: dict[int, list[torch.Tensor]] = {}
        with tqdm(total=total, desc=f"features {encoder_name} {shard}", unit="tile") as bar:
            batches = tile_loader(dataset, workers, dev)
            for k, out, error in encode_batches(run, batches, bar):
                if out is None:
                    raise ShardError(
                        shard,
                        todo[k][0].slide_id,
                        (
                            f"reading tiles for features failed: {error} ({len(rows)} slides finished in this run "
                            "are kept; rerun skips them)"
                        ),
                    )
                parts.setdefault(k, []).append(out)
                if len(parts[k]) == n_batches[k]:
                    finish(k, parts.pop(k))
    if manifest is not None:
        _write_features_manifest(manifest, jobs, statuses)
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
