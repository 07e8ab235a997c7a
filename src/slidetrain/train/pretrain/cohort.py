"""The pretraining cohort's tiles, read once into memory.

The cohort is a dataset of its own (`pretrain_only: true` in the config: drawn with its own seed and
slide ids, never split, trained or tested on). Its tiles are few (tens per slide), so holding them
as uint8 costs tens of MB and spares re-reading the slides at every step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from slidetrain.data.tilebag import BagSampling, SlideReader, read_coords, slide_paths, slide_refs
from slidetrain.errors import ConfigError

log = logging.getLogger(__name__)


def read_cohort_tiles(
    sheet_path: Path,
    slides_dir: Path,
    tiles_dir: Path,
    tile_px: int,
    target_magnification: float,
    max_tiles_per_slide: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, np.ndarray]:
    """uint8 (N, 3, tile_px, tile_px) tiles of every slide of the sheet, and the slide index of each tile.

    A slide with more than `max_tiles_per_slide` tiles contributes a seeded sample of them, so one
    large slide does not dominate the batches."""
    sheet = pd.read_csv(sheet_path, sep="\t", dtype=str, keep_default_na=False)
    if sheet.empty:
        raise ConfigError(f"pretraining cohort sheet {sheet_path} holds no slide")
    paths = slide_paths(sheet, Path(sheet_path).parent, Path(slides_dir))
    refs = slide_refs(sheet.slide_id.tolist(), [0] * len(sheet), paths, Path(tiles_dir))  # labels never read
    reader = SlideReader(BagSampling(k=1, tile_px=tile_px, target_magnification=target_magnification))
    rng = np.random.default_rng(seed)
    tiles, owner = [], []
    try:
        for i, ref in enumerate(refs):
            coords = read_coords(ref)
            if max_tiles_per_slide is not None and len(coords) > max_tiles_per_slide:
                coords = coords[np.sort(rng.choice(len(coords), max_tiles_per_slide, replace=False))]
            tiles.append(reader.read(ref, coords))
            owner.append(np.full(len(coords), i))
            if (i + 1) % 10 == 0 or i + 1 == len(refs):
                log.info("read tiles of %d/%d cohort slides", i + 1, len(refs))
    finally:
        reader.close()
    return torch.cat(tiles), np.concatenate(owner)
