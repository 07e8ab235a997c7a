"""results/bench/preprocess.csv: seconds per slide for each preprocessing stage, read from the steps' own timings."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pandas as pd

from slidetrain.io import atomic_path


def preprocess_table(
    timing_jsons: list[str | Path], feature_h5s: list[str | Path], out_csv: str | Path
) -> pd.DataFrame:
    rows = {}
    for path in timing_jsons:
        t = json.loads(Path(path).read_text())
        slide_id = t.get("slide_id", Path(path).name.split(".")[0])
        dataset = Path(path).parents[1].name  # results/{dataset}/timings/{slide}.json
        rows[(dataset, slide_id)] = {"dataset": dataset, "slide_id": slide_id, **t}
    for path in feature_h5s:
        dataset = Path(path).parents[2].name  # results/{dataset}/features/{encoder}/{slide}.h5
        slide_id = Path(path).stem
        with h5py.File(path, "r") as f:
            seconds = float(f.attrs.get("seconds", float("nan")))
        rows.setdefault((dataset, slide_id), {"dataset": dataset, "slide_id": slide_id})["features_s"] = seconds
    table = pd.DataFrame(list(rows.values()))
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    return table
