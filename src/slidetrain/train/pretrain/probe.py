"""Linear probe: how much of the slide grade a frozen encoder's mean-pooled tile features carry.

A multinomial logistic regression on each slide's mean feature (standardised with the training
part's statistics), fitted on a split's training part and read on its VALIDATION part only (the
test part is never touched here). Run for the pretrained encoder and for the same architecture at
random init, side by side, on the same tiles. Tiles are encoded as the features stage encodes them
(tile_px, ImageNet normalisation, eval mode).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidetrain.data.tilebag import BagSampling, SlideReader, read_coords, slide_paths, slide_refs, to_input
from slidetrain.evaluate.metrics import classification_metrics
from slidetrain.io import atomic_path
from slidetrain.models.encoders import build_encoder
from slidetrain.train.common import part_slides

log = logging.getLogger(__name__)


@torch.no_grad()
def mean_features(encoder, refs, sampling: BagSampling, max_tiles: int, seed: int) -> np.ndarray:
    """(slides, dim): each slide's mean feature over up to `max_tiles` of its tiles (a seeded sample)."""
    reader, rng, out = SlideReader(sampling), np.random.default_rng(seed), []
    try:
        for ref in refs:
            coords = read_coords(ref)
            if len(coords) > max_tiles:
                coords = coords[np.sort(rng.choice(len(coords), max_tiles, replace=False))]
            out.append(encoder(to_input(reader.read(ref, coords), None)).mean(0).numpy())
    finally:
        reader.close()
    return np.stack(out)


def probe_scores(train_x, train_y, val_x, val_y, n_classes: int, ordinal: bool) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(train_x, train_y)
    probs = np.zeros((len(val_x), n_classes))
    probs[:, model.classes_] = model.predict_proba(val_x)
    return classification_metrics(np.asarray(val_y), probs, ordinal=ordinal)


def run_probe(
    arch: str,
    weights: Path,
    sheet: Path,
    split_csv: Path,
    classes: list[str],
    ordinal: bool,
    slides_dir: Path,
    tiles_dir: Path,
    sampling: BagSampling,
    out_csv: Path,
    max_tiles: int = 32,
    threads: int = 1,
) -> pd.DataFrame:
    torch.set_num_threads(threads)
    sheet_df = pd.read_csv(sheet, sep="\t", dtype=str, keep_default_na=False)
    split = pd.read_csv(split_csv, dtype={"slide_id": str})
    paths = slide_paths(sheet_df, Path(sheet).parent, Path(slides_dir))
    parts = {p: part_slides(split, p, classes) for p in ("train", "val")}
    refs = {p: slide_refs(ids, ys, paths, Path(tiles_dir)) for p, (ids, ys) in parts.items()}
    rows = []
    for init, w in (("random", "none"), ("pretrained", str(weights))):
        encoder = build_encoder(arch, w).eval()
        x = {p: mean_features(encoder, refs[p], sampling, max_tiles, seed=0) for p in refs}
        scores = probe_scores(x["train"], parts["train"][1], x["val"], parts["val"][1], len(classes), ordinal)
        log.info("%s %s: validation %s", arch, init, {k: round(v, 3) for k, v in scores.items()})
        rows.append(
            {"arch": arch, "init": init, "part": "val", "n_train": len(x["train"]), "n_val": len(x["val"]), **scores}
        )
    table = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
