"""Is reading hidden? Tile-bag step time with on-the-fly reading vs the same bags already in memory.

    slidetrain bench-tilebag-step --params '{"backbone": "resnet18", "k": 16, "input_px": 64}' \
        --slides s1=path1 s2=path2 ... --tiles-dir results/synthetic/tiles --tile-px 128 \
        --target-magnification 5 --workers 1 --steps 20 --out results/bench/tilebag_step.csv

Four timings of the same `steps` bags (the dataset's seeded draws, so every
training run sees identical tiles and does identical compute):
- in memory: the bags read beforehand, then `plain` training steps;
- on the fly, warm: DataLoader with `workers` reader processes feeding the same steps, the slide
  files still in the page cache from reading the bags into memory;
- on the fly, cold: the same, each bag's slide file (and its tile-coordinate file) evicted from the
  page cache right before that bag is read (`bench.page_cache`), in fresh reader processes with
  fresh slide handles: a real cohort of multi-GB slides is read cold, once per epoch;
- reading alone: the bags read in this process with no compute (tiles read per second), beside
  the in-memory run's tiles encoded (and backpropagated) per second.
The goal is ratio = on-the-fly / in-memory seconds per step <= 1.2, warm and cold.
cold_cache_left: the largest share of a slide file still cached after an eviction (0 = the cold
pass was cold; NaN where the kernel will not tell, see `bench.page_cache`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from slidetrain.bench.page_cache import drop_and_measure, largest_left
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
        trainer.executor.step(
            item["tiles"], model.encoder, model.aggregator, torch.tensor(item["label"]), trainer.loss_fn, ctx
        )
        trainer._optimiser_step()
        n += len(item["tiles"])
    return time.perf_counter() - t0, n


class ColdBags(Dataset):
    """`dataset`'s bags, each read right after its slide's files are evicted from the page cache.

    The eviction runs where the read runs (the DataLoader worker), so prefetching cannot read a
    bag before its files are dropped. Returns the bag with the share of its files still cached.
    """

    def __init__(self, dataset: TileBagDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        ref = self.dataset.refs[i]
        left = drop_and_measure([ref.slide_path, ref.tiles_h5])
        return {**self.dataset[i], "cache_left": left}


def _noting_cache_left(bags, cache_left: list[float]):
    """The cold loader's bags as they come, each one's `cache_left` appended to `cache_left`."""
    for item in bags:
        cache_left.append(item.pop("cache_left"))
        yield item


def tilebag_step_table(
    params: dict,
    slides: list[str],
    tiles_dir: str | Path,
    tile_px: int,
    target_magnification: float,
    out_csv: str | Path,
    steps: int = 20,
    workers: int = 1,
    threads: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    torch.set_num_threads(max(1, threads))
    cfg = tilebag_config({**params, "slides_per_epoch": 1.0, "workers": workers})
    refs = []
    for item in slides:
        slide_id, _, path = item.partition("=")
        refs.append(SlideRef(slide_id, Path(path), Path(tiles_dir) / f"{slide_id}.h5", len(refs) % 2))
    refs = [refs[i % len(refs)] for i in range(steps)]  # `steps` bags, cycling over the slides given
    sampling = BagSampling(
        k=cfg.k, tile_px=tile_px, target_magnification=target_magnification, input_px=cfg.input_px, augment=cfg.augment
    )
    dataset = TileBagDataset(refs, sampling, seed)
    # the cold pass: the same seeded bags from a fresh dataset (no open handles, no cached coordinates)
    cold = ColdBags(TileBagDataset(refs, sampling, seed))
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
    warm_s, _ = _train_steps(fresh_trainer(), bag_loader(dataset, workers=workers))
    cache_left: list[float] = []
    cold_s, _ = _train_steps(fresh_trainer(), _noting_cache_left(bag_loader(cold, workers=workers), cache_left))
    row = {
        "backbone": cfg.backbone,
        "k": cfg.k,
        "tile_px": tile_px,
        "input_px": cfg.input_px or tile_px,
        "augment": cfg.augment,
        "workers": workers,
        "threads": threads,
        "steps": steps,
        "step_s_in_memory": mem_s / steps,
        "step_s_on_the_fly_warm": warm_s / steps,
        "ratio_warm": warm_s / mem_s,
        "step_s_on_the_fly_cold": cold_s / steps,
        "ratio_cold": cold_s / mem_s,
        "goal_ratio": 1.2,
        "cold_cache_left": largest_left(cache_left),
        "tiles_read_per_s": n_read / read_s,
        "tiles_encoded_per_s": n_tiles / mem_s,
    }
    table = pd.DataFrame([row])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
