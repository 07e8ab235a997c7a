"""One pretraining job: the cohort's tiles in, results/pretrain/{arch}/ out.

Outputs: `encoder.pt` (the trunk's state dict: what every `weights:` key takes), `history.csv` (loss
and positive-pair accuracy per step), `qc.png` (those curves, and pairs of views as the encoder saw
them) with `qc.csv` (the plotted data), `provenance.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path
from slidetrain.train import common
from slidetrain.train.pretrain.cohort import read_cohort_tiles
from slidetrain.train.pretrain.simclr import PretrainConfig, pretrain
from slidetrain.train.pretrain.views import ViewSettings

log = logging.getLogger(__name__)


def pretrain_config(arch: str, params: dict) -> PretrainConfig:
    """PretrainConfig from the config's flat `pretrain.params` (view keys go to ViewSettings)."""
    view_keys = {f.name for f in fields(ViewSettings)}
    known = view_keys | {f.name for f in fields(PretrainConfig)} - {"views", "arch"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"pretrain.params: unknown keys {unknown}; expected some of {sorted(known)}")
    views = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in view_keys}
    rest = {k: v for k, v in params.items() if k not in view_keys}
    return PretrainConfig(arch=arch, views=ViewSettings(**views), **rest)


def run_pretrain(
    arch: str,
    params: dict,
    sheet: Path,
    slides_dir: Path,
    tiles_dir: Path,
    tile_px: int,
    target_magnification: float,
    out_dir: Path,
    max_tiles_per_slide: int | None = None,
    threads: int = 1,
) -> None:
    torch.set_num_threads(threads)
    cfg = pretrain_config(arch, params)
    started = time.time()
    tiles, owner = read_cohort_tiles(
        sheet, slides_dir, tiles_dir, tile_px, target_magnification, max_tiles_per_slide, seed=cfg.seed
    )
    log.info(
        "%d tiles of %d cohort slides; %d steps of %d tiles", len(tiles), owner.max() + 1, cfg.steps, cfg.batch_size
    )
    state = pretrain(tiles, cfg, out_dir)
    history = pd.read_csv(out_dir / "history.csv")
    from slidetrain.train.pretrain.qc import write_qc

    write_qc(history, tiles, cfg, out_dir / "qc.png", out_dir / "qc.csv")
    extra = {"cohort_sheet": str(sheet), "cohort_slides": int(owner.max() + 1), "cohort_tiles": len(tiles)}
    extra["seconds"] = round(time.time() - started, 1)
    common.write_provenance(out_dir / "provenance.json", f"pretrain_simclr_{arch}", cfg, cfg.seed, extra)
    with atomic_path(out_dir / "encoder.pt") as tmp:  # last: its presence means the job finished
        torch.save(state, tmp)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
