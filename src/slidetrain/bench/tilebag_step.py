"""Is reading hidden? Tile-bag step time with on-the-fly reading vs the same bags already in memory.

    slidetrain bench-tilebag-step --params '{"backbone": "resnet18", "k": 16, "input_px": 64}' \
        --slides s1=path1 s2=path2 ... --tiles-dir results/synthetic/tiles --tile-px 128 \
        --target-magnification 5 --workers 1 --steps 20 --out results/bench/tilebag_step.csv

Three timings of the same `steps` bags (the dataset's seeded draws, so both
training runs see identical tiles and do identical compute):
- on the fly: DataLoader with `workers` reader processes feeding `plain` training steps;
- in memory: the bags read beforehand, then the same training steps;
- reading alone: the bags read in this process with no compute (tiles read per second), beside
  the in-memory run's tiles encoded (and backpropagated) per second.
The goal is ratio = on-the-fly / in-memory seconds per step <= 1.2.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from slidetrain.data.tilebag import BagSampling, SlideRef, TileBagDataset, bag_loader, check_item
from slidetrain.io import atomic_path
from slidetrain.train.tilebag import tilebag_config
from slidetrain.train.tilebag.model import build_tilebag_model
from slidetrain.train.tilebag.trainer import TileBagTrainer, resolve_device


def _train_steps(trainer: TileBagTrainer, bags) -> tuple[float, int]:
    """Seconds and tiles of one plain training step per bag (optimiser step every bag)."""
    model, ctx = trainer.model, trainer.ctx
    model.train()
    n = 0
    t0 = time.perf_counter()
    for item in bags:
        item = check_item(item)
        trainer.executor.step(item["tiles"], model.encoder, model.aggregator, torch.tensor(item["label"]),
                              trainer.loss_fn, ctx)
        trainer._optimiser_step()
        n += len(item["tiles"])
    return time.perf_counter() - t0, n


def tilebag_step_table(params: dict, slides: list[str], tiles_dir: str | Path, tile_px: int,
                       target_magnification: float, out_csv: str | Path, steps: int = 20, workers: int = 1,
                       threads: int = 1, seed: int = 0) -> pd.DataFrame:
    torch.set_num_threads(max(1, threads))
    cfg = tilebag_config({**params, "slides_per_epoch": 1.0, "workers": workers})
    refs = []
    for item in slides:
        slide_id, _, path = item.partition("=")
        refs.append(SlideRef(slide_id, Path(path), Path(tiles_dir) / f"{slide_id}.h5", len(refs) % 2))
    refs = [refs[i % len(refs)] for i in range(steps)]  # `steps` bags, cycling over the slides given
    sampling = BagSampling(k=cfg.k, tile_px=tile_px, target_magnification=target_magnification,
                           input_px=cfg.input_px, augment=cfg.augment)
    dataset = TileBagDataset(refs, sampling, seed)
    device = resolve_device(cfg.device)

    def fresh_trainer() -> TileBagTrainer:
        torch.manual_seed(seed)
        return TileBagTrainer(build_tilebag_model(cfg, 2, seed), cfg, sampling, refs, seed, device)

    # warm-up: one step each, so that first-call costs (allocations, thread pools) count for neither
    _train_steps(fresh_trainer(), [dataset[0]])

    t0 = time.perf_counter()
    in_memory = [check_item(dataset[i]) for i in range(len(dataset))]
    read_s = time.perf_counter() - t0
    n_read = sum(len(b["tiles"]) for b in in_memory)

    mem_s, n_tiles = _train_steps(fresh_trainer(), in_memory)
    fly_s, _ = _train_steps(fresh_trainer(), bag_loader(dataset, workers=workers))
    row = {
        "backbone": cfg.backbone, "k": cfg.k, "tile_px": tile_px, "input_px": cfg.input_px or tile_px,
        "augment": cfg.augment, "workers": workers, "threads": threads, "steps": steps,
        "step_s_on_the_fly": fly_s / steps, "step_s_in_memory": mem_s / steps,
        "ratio": fly_s / mem_s, "goal_ratio": 1.2,
        "tiles_read_per_s": n_read / read_s, "tiles_encoded_per_s": n_tiles / mem_s,
    }
    table = pd.DataFrame([row])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
