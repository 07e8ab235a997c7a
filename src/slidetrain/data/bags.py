"""Bags of frozen tile features for one split part, read from the per-slide feature files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slidetrain.errors import SlidetrainError
from slidetrain.wsi.features import read_features


@dataclass
class Bag:
    slide_id: str
    label: int
    features: torch.Tensor  # (N, D)
    coords: np.ndarray  # (N, 2) level-0 top-left


def load_bags(slide_ids: list[str], labels: list[int], features_dir: Path) -> list[Bag]:
    """Every slide must have a non-empty feature file: a missing one is an error, not a skip."""
    bags = []
    for slide_id, label in zip(slide_ids, labels, strict=True):
        path = Path(features_dir) / f"{slide_id}.h5"
        if not path.exists():
            raise SlidetrainError(f"slide {slide_id}: feature file {path} missing; run the features rule first")
        features, coords = read_features(path)
        if len(features) == 0:
            raise SlidetrainError(f"slide {slide_id}: feature file {path} holds no tiles")
        bags.append(Bag(slide_id, int(label), torch.from_numpy(features), coords))
    return bags
