"""Bags of frozen tile features for one split part, read from the per-slide feature files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slidetrain.errors import SlideError, SlidetrainError
from slidetrain.wsi.external_features import check_dims, read_slide_features
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
        if path.exists():
            features, coords = read_features(path) if _ours(path) else read_slide_features(features_dir, slide_id)
        else:  # TRIDENT's / CLAM's layouts (h5_files/, pt_files/); a missing slide is an error naming it
            try:
                features, coords = read_slide_features(features_dir, slide_id)
            except SlideError as err:
                raise SlidetrainError(f"{err}; run the features rule first or point features_dir at them") from err
        if len(features) == 0:
            raise SlidetrainError(f"slide {slide_id}: feature file {path} holds no tiles")
        bags.append(Bag(slide_id, int(label), torch.from_numpy(features), coords))
    check_dims({b.slide_id: b.features.shape[1] for b in bags}, features_dir)
    return bags


def _ours(path: Path) -> bool:
    """slidetrain's own feature files carry the `complete` flag (absent from TRIDENT's and CLAM's)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "complete" in f.attrs
    except OSError:
        return True  # unreadable: read_features reports it
