"""Per-slide tile features other tools wrote (TRIDENT, CLAM), read without re-extraction.

Layouts read, per slide (`{slide}` = slide_id), looked for in this order under a features folder:

| file                         | written by                              | content                                   |
|------------------------------|-----------------------------------------|-------------------------------------------|
| `{slide}.h5`                 | slidetrain; TRIDENT `features_{encoder}/` | `features` (N, D), `coords` (N, 2)        |
| `h5_files/{slide}.h5`        | CLAM `extract_features_fp.py`           | `features` (N, D), `coords` (N, 2)        |
| `{slide}.pt`, `pt_files/{slide}.pt` | CLAM                   | a (N, D) tensor; coords from the h5 twin |

TRIDENT puts the tile geometry in the attributes of `coords` (patch_size, patch_size_level0,
level0_magnification, target_magnification, overlap); CLAM's patching writes patch_level and
patch_size there. slidetrain's own files carry `complete` (written last) and `encoder`/`weights`
attributes on the file; a slidetrain file without `complete` is an interrupted extraction and an
error, while files of other tools have no such flag and are taken as complete. A (1, N, D)
`features` dataset (some CLAM versions) is squeezed to (N, D).
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from slidetrain.errors import SlideError

log = logging.getLogger(__name__)

CANDIDATES = ("{s}.h5", "h5_files/{s}.h5", "{s}.pt", "pt_files/{s}.pt")


def find_feature_file(features_dir: str | Path, slide_id: str) -> Path:
    """The slide's feature file in any supported layout; a missing one is an error naming the slide and the paths."""
    root = Path(features_dir)
    for pattern in CANDIDATES:
        path = root / pattern.format(s=slide_id)
        if path.is_file():
            return path
    looked = ", ".join(str(root / p.format(s=slide_id)) for p in CANDIDATES)
    raise SlideError(slide_id, f"no feature file in {root} (looked for {looked})")


def _as_nd(features: np.ndarray, slide_id: str, path: Path) -> np.ndarray:
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise SlideError(slide_id, f"{path}: `features` has shape {features.shape}, expected (N, D)")
    return features.astype(np.float32, copy=False)


def _check_h5(f: h5py.File, slide_id: str, path: Path) -> None:
    """A complete file (slidetrain's own carry the flag) with a `features` dataset."""
    if "complete" in f.attrs and not bool(f.attrs["complete"]):
        raise SlideError(slide_id, f"{path}: feature file is incomplete (extraction was interrupted)")
    if "features" not in f:
        raise SlideError(slide_id, f"{path}: no `features` dataset (found {sorted(f.keys())})")


def read_slide_features(features_dir: str | Path, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2)) of one slide from slidetrain's, TRIDENT's or CLAM's layout."""
    path = find_feature_file(features_dir, slide_id)
    if path.suffix == ".pt":
        import torch

        features = torch.load(path, map_location="cpu", weights_only=True)
        features = _as_nd(np.asarray(features.float().numpy()), slide_id, path)
        twin = path.parent.parent / "h5_files" / f"{slide_id}.h5" if path.parent.name == "pt_files" else None
        if twin is not None and twin.is_file():
            with h5py.File(twin, "r") as f:
                coords = f["coords"][:]
        else:
            log.warning("slide %s: %s has no coordinates (no h5 twin); coords set to -1", slide_id, path)
            coords = np.full((len(features), 2), -1, np.int64)
    else:
        try:
            with h5py.File(path, "r") as f:
                _check_h5(f, slide_id, path)
                features = _as_nd(f["features"][:], slide_id, path)
                coords = f["coords"][:] if "coords" in f else np.full((len(features), 2), -1, np.int64)
        except OSError as err:
            raise SlideError(slide_id, f"{path}: not a readable h5 file ({err})") from err
    coords = np.asarray(coords).reshape(-1, 2)
    if len(coords) != len(features):
        raise SlideError(slide_id, f"{path}: {len(features)} feature rows but {len(coords)} coordinates")
    return features, coords


def slide_feature_shape(features_dir: str | Path, slide_id: str) -> tuple[Path, int, int]:
    """(file, N tiles, D) of one slide, from the h5 dataset shapes without reading the features (a folder of
    foundation-model features holds tens of GB); a .pt file is read whole. Errors as read_slide_features."""
    path = find_feature_file(features_dir, slide_id)
    if path.suffix == ".pt":
        features, _ = read_slide_features(features_dir, slide_id)
        return path, *features.shape
    try:
        with h5py.File(path, "r") as f:
            _check_h5(f, slide_id, path)
            shape = f["features"].shape
            n_coords = f["coords"].shape[0] if "coords" in f else None
    except OSError as err:
        raise SlideError(slide_id, f"{path}: not a readable h5 file ({err})") from err
    if len(shape) == 3 and shape[0] == 1:  # (1, N, D): some CLAM versions
        shape = shape[1:]
    if len(shape) != 2:
        raise SlideError(slide_id, f"{path}: `features` has shape {shape}, expected (N, D)")
    if n_coords is not None and n_coords != shape[0]:
        raise SlideError(slide_id, f"{path}: {shape[0]} feature rows but {n_coords} coordinates")
    return path, int(shape[0]), int(shape[1])


def check_dims(dims: dict[str, int], features_dir: str | Path, expected: int | None = None) -> int:
    """Every slide's feature dimension equal (to `expected` when given); otherwise an error naming the odd slides."""
    if not dims:
        return expected or 0
    want = expected if expected is not None else max(set(dims.values()), key=list(dims.values()).count)
    odd = {s: d for s, d in dims.items() if d != want}
    if odd:
        first = next(iter(odd))
        raise SlideError(
            first,
            f"features in {features_dir} have dimension {odd[first]}, expected {want} "
            f"(slides of another dimension: {list(odd)[:10]})",
        )
    return want


def external_feature_index(features_dir: str | Path, slide_ids: list[str], out_csv: str | Path, dim: int | None = None):
    """index.csv (slide_id, n_tiles, dim, empty, path) of a folder of precomputed features, checked slide by slide.

    Every slide of the sheet needs a file with at least one tile, all of one dimension (`dim` when given):
    the MIL methods train on them as they are, so a slide without a file, with no tiles or of another
    dimension is an error naming it and the folder (the missing ones listed together)."""
    import pandas as pd

    from slidetrain.io import atomic_path

    rows, dims, missing = [], {}, []
    for slide_id in slide_ids:
        try:
            find_feature_file(features_dir, slide_id)
        except SlideError:
            missing.append(slide_id)
            continue
        path, n_tiles, dims[slide_id] = slide_feature_shape(features_dir, slide_id)
        if n_tiles == 0:
            raise SlideError(slide_id, f"{path} holds no tiles; features in {features_dir} need at least one per slide")
        rows.append({"slide_id": slide_id, "n_tiles": n_tiles, "dim": dims[slide_id], "empty": False, "path": path})
    if missing:
        first = missing[0]
        raise SlideError(
            first,
            f"no feature file in {features_dir} (looked for "
            f"{', '.join(p.format(s=first) for p in CANDIDATES)}); {len(missing)} of {len(slide_ids)} slides "
            f"of the sheet have none: {missing[:10]}",
        )
    check_dims(dims, features_dir, dim)
    table = pd.DataFrame(rows, columns=["slide_id", "n_tiles", "dim", "empty", "path"])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
