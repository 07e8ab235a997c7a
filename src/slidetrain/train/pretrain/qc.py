"""The pretraining QC figure: loss and positive-pair accuracy per step, and pairs of views as trained.

A run that learned shows a falling loss and a pair accuracy well above chance (1 / (2B - 1)); the
views show whether the augmentations leave tissue recognisable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidetrain.io import atomic_path
from slidetrain.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from slidetrain.train.pretrain.simclr import PretrainConfig
from slidetrain.train.pretrain.views import two_views

N_PAIRS = 6


def _to_rgb(views: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (views * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def write_qc(history: pd.DataFrame, tiles: torch.Tensor, cfg: PretrainConfig, png: Path, csv: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = 1.0 / (2 * cfg.batch_size - 1)
    data = history[["step", "loss", "pair_accuracy"]].assign(chance=chance)
    gen = torch.Generator().manual_seed(cfg.seed)
    picks = torch.randperm(len(tiles), generator=gen)[:N_PAIRS]
    v1, v2 = (_to_rgb(v) for v in two_views(tiles[picks], cfg.views, gen))
    fig = plt.figure(figsize=(10, 5.5))
    grid = fig.add_gridspec(3, N_PAIRS, height_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(grid[0, : N_PAIRS // 2])
    ax.plot(data.step, data.loss, color="tab:blue")
    ax.set(xlabel="step", ylabel="NT-Xent loss", title=f"{cfg.arch}: SimCLR loss")
    ax = fig.add_subplot(grid[0, N_PAIRS // 2 :])
    ax.plot(data.step, data.pair_accuracy, color="tab:green", label="pair found")
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.3f})")
    ax.set(xlabel="step", ylabel="fraction of views", ylim=(0, 1), title="nearest other view is its pair")
    ax.legend(loc="upper left", fontsize=8)
    for i in range(N_PAIRS):
        for row, views in ((1, v1), (2, v2)):
            ax = fig.add_subplot(grid[row, i])
            ax.imshow(views[i])
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(f"view {row}", fontsize=8)
    fig.suptitle(f"{cfg.arch} SimCLR pretraining; below, two views of one tile per column as the encoder saw them")
    fig.tight_layout()
    with atomic_path(csv) as tmp:
        data.to_csv(tmp, index=False)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
