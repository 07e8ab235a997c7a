"""Table 3 of Zhang et al. (MICCAI 2022): whole-slide inference speed, tile pipeline vs local learning.

Both pipelines start from the slide FILE and end with class probabilities,
on the same slides, device and thread count, side by side::

    slidetrain bench-inference --slides a.tiff b.svs --device cpu --threads 2 \\
        --out table3.csv --markdown table3.md

gabmil (the paper's GABMIL baseline at 5x, 224 px tiles like its pipeline)
  tiling      open the slide, tissue mask (`wsi.mask.segment_tissue`), tile
              coordinates at 5x (`wsi.tile.tile_coordinates`, 224 px, no
              overlap, >= 50 % tissue)
  features    read the tiles at 5x with OpenSlide (`wsi.tile.read_tiles`:
              the pyramid level at or finer than 5x, neighbours in a row in
              one read) and embed them with ResNet34 truncated after layer4 +
              average pooling (`models.encoders`, 512-d), batched, no_grad
  prediction  gated ABMIL (`models.abmil`, registry name "gabmil") on the (N, 512) bag
local_k4 (whole-slide inference of the locally supervised ResNet34, K=4)
  reading     open the slide, tissue mask (the same call), the tissue box read
              ONCE from the pyramid level at or finer than 5x (the 5x level
              itself when the pyramid has one) and area-averaged to 5x,
              background white (`wsi.image.extract_slide_image`, what training
              sees), as a normalised (3, H, W) float tensor on the device
  prediction  `LocalLearner.predict`: backbone (stride-3 stem) + final head, no_grad

Weights are random (timing only: the work does not depend on the numbers;
the tile encoder uses its seeded random init, the learner torch's seed).
Reading: both pipelines open the slide with the same reader (`reader`, default
auto: tiled TIFF-family files through tifffile + imagecodecs, `wsi.tiffread`,
about 3x OpenSlide's `read_region`; `bench.read_speed` compares the two).
Timing: per slide, each pipeline runs `warmup` times untimed (model kernels,
allocator, the OS file cache) and `repeats` times timed; a stage's seconds
are its mean over the repeats and `total` is the sum of the stages. Each
run opens the slide anew, so OpenSlide's per-handle tile cache starts empty
for both. On CUDA every stage ends with `torch.cuda.synchronize`.

Rows: image_size ("WxH" of the 5x tissue image that local learning sees,
for both methods), method, stage, seconds, speed_gain (on the two `total`
rows: gabmil total / local_k4 total; empty elsewhere), device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidetrain.models import build_model, method_config
from slidetrain.models.encoders import build_encoder
from slidetrain.paper.tables import write_table
from slidetrain.train.wholeimage.augment import normalise
from slidetrain.train.wholeimage.registry import build_learner
from slidetrain.wsi.features import embed_tiles
from slidetrain.wsi.image import extract_slide_image
from slidetrain.wsi.mask import MaskParams, mask_params, segment_tissue
from slidetrain.wsi.slide import open_slide
from slidetrain.wsi.tile import read_tiles, tile_coordinates

log = logging.getLogger(__name__)

MAGNIFICATION = 5.0
TILE_PX = 224  # the paper's GABMIL pipeline (ResNet34 features at 5x)
TABLE3_COLUMNS = ["image_size", "method", "stage", "seconds", "speed_gain", "device"]
STAGES = {"gabmil": ("tiling", "features", "prediction"), "local_k4": ("reading", "prediction")}


@dataclass
class InferenceSetup:
    """Models and knobs shared by every slide of one benchmark run."""

    device: torch.device
    encoder: torch.nn.Module  # tile encoder, (B, 3, 224, 224) -> (B, 512)
    gabmil: torch.nn.Module  # (N, 512) -> MILOutput
    local: object  # a WholeImageLearner (local_k4) with .predict
    tile_px: int = TILE_PX
    magnification: float = MAGNIFICATION
    batch_size: int = 64
    min_tissue_fraction: float = 0.5
    mask: MaskParams = field(default_factory=lambda: mask_params("default"))
    mpp_fallback: float | None = None
    reader: str = "auto"  # open_slide's reader, the same for both pipelines
    threads: int = 2  # tifffile decoding threads (reader auto)


def build_setup(
    device: str = "cpu",
    *,
    tile_px: int = TILE_PX,
    batch_size: int = 64,
    min_tissue_fraction: float = 0.5,
    n_classes: int = 2,
    seed: int = 0,
    mask_preset: str = "default",
    mpp_fallback: float | None = None,
    reader: str = "auto",
    threads: int = 2,
) -> InferenceSetup:
    """Random-init ResNet34 tile encoder + gated ABMIL, and a random-init local_k4 learner."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    encoder = build_encoder("resnet34", "none", seed).to(dev).eval()
    gabmil = build_model("gabmil", encoder.dim, n_classes, method_config("gabmil", {})).to(dev).eval()
    local = build_learner("local_k4", n_classes, {"weights": "none"}, device=dev)
    return InferenceSetup(
        dev,
        encoder,
        gabmil,
        local,
        tile_px=tile_px,
        batch_size=batch_size,
        min_tissue_fraction=min_tissue_fraction,
        mask=mask_params(mask_preset),
        mpp_fallback=mpp_fallback,
        reader=reader,
        threads=threads,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Seconds per stage; on CUDA the device is synchronised before each reading."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        _sync(device)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


@torch.no_grad()
def run_gabmil(slide_path: str | Path, setup: InferenceSetup) -> tuple[dict[str, float], dict]:
    """The tile pipeline on one slide: (seconds per stage, info)."""
    clock = _Clock(setup.device)
    with open_slide(slide_path, mpp_fallback=setup.mpp_fallback, reader=setup.reader, threads=setup.threads) as slide:
        tissue = segment_tissue(slide, setup.mask)
        coords = tile_coordinates(
            slide, tissue, setup.magnification, setup.tile_px, 0, setup.min_tissue_fraction
        )  # (N, 2) level-0 x, y
        clock.lap("tiling")
        tiles = read_tiles(slide, coords, setup.magnification, setup.tile_px)
        features = embed_tiles(setup.encoder, tiles, setup.batch_size, setup.device)  # (N, 512)
        bag = torch.from_numpy(features).to(setup.device)
        clock.lap("features")
        probs = torch.softmax(setup.gabmil(bag).logits.float(), dim=0).cpu()  # (C,)
        clock.lap("prediction")
    return clock.seconds, {"n_tiles": int(len(coords)), "probs": probs.tolist()}


@torch.no_grad()
def run_local(slide_path: str | Path, setup: InferenceSetup) -> tuple[dict[str, float], dict]:
    """Whole-slide inference on one slide: (seconds per stage, info with the 5x image size)."""
    clock = _Clock(setup.device)
    with open_slide(slide_path, mpp_fallback=setup.mpp_fallback, reader=setup.reader, threads=setup.threads) as slide:
        tissue = segment_tissue(slide, setup.mask)
        rgb, meta = extract_slide_image(slide, tissue, setup.magnification)  # (H, W, 3) uint8
    # (3, H, W) contiguous, as in training; converted on the device
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(setup.device)
    image = normalise(image.float().div_(255))
    del rgb
    clock.lap("reading")
    probs = setup.local.predict(image)  # (C,) on the CPU
    clock.lap("prediction")
    return clock.seconds, {
        "image_size": f"{meta['size'][0]}x{meta['size'][1]}",
        "read_level": meta["read_level"],
        "probs": probs.tolist(),
    }


def _timed(
    fn: Callable[[str | Path, InferenceSetup], tuple[dict[str, float], dict]],
    slide_path: str | Path,
    setup: InferenceSetup,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, float], dict]:
    for _ in range(warmup):
        fn(slide_path, setup)
    runs = [fn(slide_path, setup) for _ in range(repeats)]
    stages = runs[0][0].keys()
    return {s: float(np.mean([r[0][s] for r in runs])) for s in stages}, runs[-1][1]


def benchmark_slide(slide_path: str | Path, setup: InferenceSetup, warmup: int = 1, repeats: int = 1) -> list[dict]:
    """Table 3 rows of one slide (both pipelines, every stage, the totals and the gain)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench-inference: expected repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    gab_s, gab_info = _timed(run_gabmil, slide_path, setup, warmup, repeats)
    loc_s, loc_info = _timed(run_local, slide_path, setup, warmup, repeats)
    size, device = loc_info["image_size"], str(setup.device)
    totals = {"gabmil": sum(gab_s.values()), "local_k4": sum(loc_s.values())}
    gain = totals["gabmil"] / totals["local_k4"]
    log.info(
        "%s: 5x image %s, %d tiles of %d px; gabmil %.2f s, local_k4 %.2f s, gain %.2fx",
        Path(slide_path).name,
        size,
        gab_info["n_tiles"],
        setup.tile_px,
        totals["gabmil"],
        totals["local_k4"],
        gain,
    )
    rows = []
    for method, seconds in (("gabmil", gab_s), ("local_k4", loc_s)):
        for stage in STAGES[method]:
            rows.append(
                dict(
                    image_size=size,
                    method=method,
                    stage=stage,
                    seconds=seconds[stage],
                    speed_gain=np.nan,
                    device=device,
                )
            )
        rows.append(
            dict(
                image_size=size,
                method=method,
                stage="total",
                seconds=totals[method],
                speed_gain=gain,
                device=device,
            )
        )
    return rows


def bench_inference(
    slide_paths: list[str | Path],
    out_csv: str | Path,
    out_md: str | Path | None = None,
    *,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 1,
    repeats: int = 1,
    batch_size: int = 64,
    tile_px: int = TILE_PX,
    min_tissue_fraction: float = 0.5,
    seed: int = 0,
    mask_preset: str = "default",
    mpp_fallback: float | None = None,
    reader: str = "auto",
    out_html: str | Path | None = None,
) -> pd.DataFrame:
    """`slidetrain bench-inference`: Table 3 rows for every slide, written as CSV (and Markdown)."""
    if threads:
        torch.set_num_threads(int(threads))
    setup = build_setup(
        device,
        tile_px=tile_px,
        batch_size=batch_size,
        min_tissue_fraction=min_tissue_fraction,
        seed=seed,
        mask_preset=mask_preset,
        mpp_fallback=mpp_fallback,
        reader=reader,
        threads=int(threads) if threads else 2,
    )
    rows = [row for path in slide_paths for row in benchmark_slide(path, setup, warmup, repeats)]
    table = pd.DataFrame(rows, columns=TABLE3_COLUMNS)
    write_table(
        table,
        out_csv,
        out_md,
        out_html,
        "Table 3: inference seconds per slide, tile pipeline vs whole slide",
        float_format="%.4f",
    )
    return table


__all__ = [
    "MAGNIFICATION",
    "STAGES",
    "TABLE3_COLUMNS",
    "TILE_PX",
    "InferenceSetup",
    "bench_inference",
    "benchmark_slide",
    "build_setup",
    "run_gabmil",
    "run_local",
]
