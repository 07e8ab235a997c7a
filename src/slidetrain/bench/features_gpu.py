"""GPU script section `features_throughput`: ResNet34 tile features at 224 px, end to end vs model only.

Runs without OpenSlide or h5py. The "slide" is a set of distinct synthetic tiles kept as
JPEG bytes, as a JPEG-compressed WSI stores them: end to end, DataLoader workers decode
them into uint8 batches (pinned), the encoder runs on the device (AMP on or off), and the
features of each 1,024-tile "slide" come back to the host and are written as .npy files.
Model only: the same encoder on the same batches already decoded in (pinned) host memory.
Goal on one GPU: >= 2,000 tiles/s end to end (issue 16).

Then the pathology foundation models (issue 27): UNI's ViT-L/16 (`uni`) and H-optimus-0's ViT-g/14
(`hoptimus0`) at 224 px under bfloat16 autocast, at random init (nothing downloads), end to end and
model only on the same JPEG tiles, each row beside the tiles/s users report for UNI2-h extraction in
TRIDENT (paper/data/external_throughput.csv). --tiny: the test ViT (`vit_tiny_test`) on the CPU.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from slidetrain.models.encoders import build_encoder
from slidetrain.wsi.encode import TileEncoder, encode_batches, tile_loader

GOAL_TILES_PER_S = 2000
TILES_PER_SLIDE = 1024
#: the foundation models timed (registry names) and the reported rate each row is set beside
FOUNDATION_ENCODERS = ("uni", "hoptimus0")
TINY_FOUNDATION_ENCODERS = ("vit_tiny_test",)
REFERENCE = ("UNI2-h", "TRIDENT")


def synthetic_jpeg_tiles(n: int, tile_px: int, seed: int = 0) -> list[bytes]:
    """`n` distinct tissue-like RGB tiles (smooth colour fields + noise), JPEG quality 80 as scanners write."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tiles = []
    yy, xx = np.mgrid[0:tile_px, 0:tile_px] / tile_px
    for _ in range(n):
        f = rng.uniform(2, 12, size=3)
        base = np.stack([np.sin(f[c] * (xx + rng.uniform()) + f[(c + 1) % 3] * yy) for c in range(3)], -1)
        rgb = np.clip(180 + 60 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=80)
        tiles.append(buf.getvalue())
    return tiles


class JpegTileBatches(torch.utils.data.Dataset):
    """Item i: (slide index, uint8 (B, T, T, 3) decoded from JPEG in the worker, ""), like ShardTileBatches."""

    def __init__(self, jpegs: list[bytes], n_tiles: int, batch_size: int):
        self.jpegs, self.n_tiles, self.batch_size = jpegs, n_tiles, batch_size
        per = TILES_PER_SLIDE
        self.items = [
            (a // per, a, min(a + batch_size, (a // per + 1) * per, n_tiles))
            for s in range(0, n_tiles, per)
            for a in range(s, min(s + per, n_tiles), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        k, a, b = self.items[i]
        tiles = [
            np.asarray(Image.open(io.BytesIO(self.jpegs[j % len(self.jpegs)])).convert("RGB")) for j in range(a, b)
        ]
        return k, torch.from_numpy(np.stack(tiles)), ""  # (B, T, T, 3) uint8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(run: TileEncoder, dataset: JpegTileBatches, workers: int, out_dir: Path) -> float:
    """Tiles/s: decode in workers, encode, features of each slide to the host and to disk."""
    parts: dict[int, list[torch.Tensor]] = {}
    per_slide = {}
    for k, _, _ in dataset.items:
        per_slide[k] = per_slide.get(k, 0) + 1
    _sync(run.device)
    t0 = time.perf_counter()
    for k, feats, error in encode_batches(run, tile_loader(dataset, workers, run.device)):
        if feats is None:
            raise RuntimeError(error)
        parts.setdefault(k, []).append(feats)
        if len(parts[k]) == per_slide[k]:
            np.save(out_dir / f"slide_{k:04d}.npy", torch.cat(parts.pop(k)).cpu().numpy())  # (N, D)
    _sync(run.device)
    return dataset.n_tiles / (time.perf_counter() - t0)


def model_only(run: TileEncoder, dataset: JpegTileBatches) -> float:
    """Tiles/s of the encoder on the same batches, decoded beforehand into (pinned) host memory."""
    from PIL import Image

    # decode each distinct tile once (the decode is what end to end pays and this does not)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in dataset.jpegs])  # (J, T, T, 3)
    batches = [torch.from_numpy(decoded[np.arange(a, b) % len(decoded)]) for _, a, b in dataset.items]
    if run.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    run(batches[0])  # warm-up: cuDNN autotuning, allocator
    _sync(run.device)
    t0 = time.perf_counter()
    outs = [run(b) for b in batches]
    torch.cat(outs).cpu()
    _sync(run.device)
    return dataset.n_tiles / (time.perf_counter() - t0)


def features_throughput_section(ctx) -> Iterator[dict]:
    """Rows per (amp, workers), each yielded as measured: end-to-end and model-only tiles/s of ResNet34 at
    224 px. The .npy features go to the run's temporary directory (ctx.tmp_dir), never to the output."""
    tiny = ctx.tiny
    encoder_name, tile_px = ("resnet18", 64) if tiny else ("resnet34", 224)
    n_tiles, batch_size = (48, 16) if tiny else (16_384, 256)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    worker_counts = [1] if tiny else sorted({max(1, min(8, cpus - 2)), max(1, min(14, cpus - 2))})
    settings = [(False, w) for w in worker_counts] + ([] if ctx.device.type != "cuda" else [(True, worker_counts[-1])])
    jpegs = synthetic_jpeg_tiles(32 if tiny else 512, tile_px)
    dataset = JpegTileBatches(jpegs, n_tiles, batch_size)
    encoder = build_encoder(encoder_name, "none", 0)
    out_dir = Path(ctx.tmp_dir) / "features_npy"
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + 0.8 * ctx.cap_s
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = ctx.device.type == "cuda"  # fixed tile shapes: autotune once
    try:
        for i, (amp, workers) in enumerate(settings):
            if i and time.perf_counter() > deadline:
                break  # keep the section inside its cap; the rows so far stand
            run = TileEncoder(encoder, ctx.device, amp=amp)
            model = model_only(run, dataset)
            end_to_end_rate = end_to_end(run, dataset, workers, out_dir)
            for f in out_dir.glob("*.npy"):
                f.unlink()
            yield {
                "device": str(ctx.device),
                "encoder": encoder_name,
                "tile_px": tile_px,
                "batch_size": batch_size,
                "workers": workers,
                "amp": run.amp,
                "n_tiles": n_tiles,
                "tiles_per_s_end_to_end": round(end_to_end_rate, 1),
                "tiles_per_s_model_only": round(model, 1),
                "ratio": round(end_to_end_rate / model, 3),
                "goal_end_to_end": GOAL_TILES_PER_S,
                "meets_goal": bool(end_to_end_rate >= GOAL_TILES_PER_S),
            }
        yield from foundation_rows(ctx, jpegs, tile_px, workers=worker_counts[-1], deadline=deadline)
    finally:
        # later sections (local_learning's max_memory_allocated) must not pay for autotuning workspaces
        torch.backends.cudnn.benchmark = benchmark


def build_on_device(name: str, device: torch.device) -> torch.nn.Module:
    """A foundation model at random init, built on `device` (a ViT-g's initialisation on the CPU takes
    tens of seconds; on the GPU well under one)."""
    with torch.device(device):
        return build_encoder(name, "none", 0)


def foundation_rows(ctx, jpegs: list[bytes], tile_px: int, workers: int, deadline: float) -> Iterator[dict]:
    """One row per foundation model: tiles/s end to end and model only under bfloat16 autocast (CUDA),
    beside the reported UNI2-h rate in TRIDENT. A model not started before `deadline` is a skipped row."""
    from slidetrain.paper.reference import external_tiles_per_s

    names = TINY_FOUNDATION_ENCODERS if ctx.tiny else FOUNDATION_ENCODERS
    n_tiles, batch_size = (32, 16) if ctx.tiny else (2048, 256)  # two 1,024-tile "slides": a ViT-g runs ~0.5k/s
    reference = external_tiles_per_s(*REFERENCE)
    dataset = JpegTileBatches(jpegs, n_tiles, batch_size)
    out_dir = Path(ctx.tmp_dir) / "features_npy"
    for name in names:
        row = {"device": str(ctx.device), "encoder": name, "tile_px": tile_px, "batch_size": batch_size}
        row |= {"workers": workers, "n_tiles": n_tiles}
        row |= {"reference_tiles_per_s": reference, "reference": " in ".join(REFERENCE) + " (users' reports)"}
        if time.perf_counter() > deadline:
            yield {**row, "status": "skipped: out of the section's time"}
            continue
        t0 = time.perf_counter()
        run = TileEncoder(build_on_device(name, ctx.device), ctx.device, amp=True, amp_dtype=torch.bfloat16)
        build_s = time.perf_counter() - t0
        model = model_only(run, dataset)
        rate = end_to_end(run, dataset, workers, out_dir)
        for f in out_dir.glob("*.npy"):
            f.unlink()
        yield {
            **row,
            "amp": run.amp,
            "amp_dtype": "bfloat16" if run.amp else None,  # autocast is CUDA-only in TileEncoder
            "input_px": run.encoder.spec.input_size,  # the card's size the tiles are resized to
            "tiles_per_s_end_to_end": round(rate, 1),
            "tiles_per_s_model_only": round(model, 1),
            "ratio": round(rate / model, 3),
            "vs_reference": round(rate / reference, 2),
            "build_s": round(build_s, 1),
            "status": "ok",
        }
        del run
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
