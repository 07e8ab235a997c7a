"""`on_bad_slide`: fail on an unusable slide (default), or exclude it with its reason on record.

An excluded slide still gets every per-slide output (Snakemake's DAG is fixed
when the workflow is parsed), but as placeholders flagged `excluded` that the
later steps recognise: features are empty, splits leave the slide out, and
`results/qc/excluded.csv` lists it with the reason. Nothing is skipped silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from PIL import Image, ImageDraw

from slidetrain.errors import SlideError
from slidetrain.io import atomic_path, write_json

if TYPE_CHECKING:  # pandas costs 0.2 s to import; per-slide jobs do not need it
    import pandas as pd

log = logging.getLogger(__name__)

OUTPUT_KEYS = ("mask_png", "qc_path", "tiles_h5", "image_path", "image_meta_json", "timings_json")


def preprocess_or_exclude(
    slide_path: str | Path,
    slide_id: str,
    outputs: dict,
    params: dict,
    on_bad_slide: str,
    status_json: str | Path,
    fingerprint: str | None = None,
) -> dict:
    from slidetrain.data.download import exclusion_reason
    from slidetrain.wsi.preprocess import preprocess_slide

    # The status file is written last: it marks the slide complete (with the parameters' fingerprint).
    stamp = {"fingerprint": fingerprint} if fingerprint else {}
    missing = [k for k in OUTPUT_KEYS if k not in outputs]
    if missing:
        raise ValueError(f"preprocess outputs lack {missing}")
    try:
        download_failure = exclusion_reason(slide_path)  # a download excluded with on_bad_slide: exclude
        if download_failure is not None:
            raise SlideError(slide_id, f"not downloaded: {download_failure}")
        timings = preprocess_slide(slide_path, slide_id, **outputs, **params)
    except SlideError as err:
        if on_bad_slide != "exclude":
            raise
        log.warning("excluding %s: %s", slide_id, err)
        write_placeholders(slide_id, outputs, str(err))
        write_json(status_json, {"slide_id": slide_id, "status": "excluded", "reason": str(err), **stamp})
        return {"excluded": str(err)}
    write_json(status_json, {"slide_id": slide_id, "status": "ok", "reason": "", **stamp})
    return timings


def write_placeholders(slide_id: str, outputs: dict, reason: str) -> None:
    """Every per-slide output, flagged excluded, so the DAG completes and later steps know why."""
    with atomic_path(outputs["mask_png"]) as tmp:
        Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp, format="PNG")
    picture = Image.new("RGB", (640, 120), "white")
    ImageDraw.Draw(picture).multiline_text((10, 10), f"{slide_id}: EXCLUDED\n{reason[:300]}", fill="red")
    with atomic_path(outputs["qc_path"]) as tmp:
        picture.save(tmp, format="PNG" if str(outputs["qc_path"]).endswith(".png") else "JPEG")
    with atomic_path(outputs["tiles_h5"]) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.zeros((0, 2), np.int64))
            f["coords"].attrs["excluded"] = reason
            f.attrs["excluded"] = reason
    with atomic_path(outputs["image_path"]) as tmp:
        Image.new("RGB", (1, 1), "white").save(tmp, format="JPEG")
    write_json(outputs["image_meta_json"], {"slide_id": slide_id, "excluded": reason})
    write_json(outputs["timings_json"], {"slide_id": slide_id, "excluded": reason})


def read_status(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def excluded_slides(status_table: str | Path) -> dict[str, str]:
    """slide_id -> reason, for every excluded slide of a dataset's status table."""
    table = read_status_table(status_table)
    excluded = table[table.status == "excluded"]
    return dict(zip(excluded.slide_id, excluded.reason, strict=True))


def write_exclusion_table(status_tables: list[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """results/qc/excluded.csv: dataset, slide_id, reason (dataset = the folder above qc/)."""
    import pandas as pd

    rows = []
    for path in status_tables:
        dataset = Path(path).parents[1].name  # results/{dataset}/qc/status.csv
        for slide_id, reason in excluded_slides(path).items():
            rows.append({"dataset": dataset, "slide_id": slide_id, "reason": reason})
    table = pd.DataFrame(rows, columns=["dataset", "slide_id", "reason"])
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


def write_status_table(status_files: list[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """results/{dataset}/qc/status.csv: one row per slide (slide_id, status, reason), the per-dataset QC index."""
    import pandas as pd

    rows = [read_status(p) for p in status_files]
    table = pd.DataFrame(rows, columns=["slide_id", "status", "reason"]).fillna("")
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


def read_status_table(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)


def write_status_table_from_manifests(manifests: list[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """The same table from a dataset's preprocess shard manifests (one file per shard, not per slide)."""
    import pandas as pd

    from slidetrain.data.shards import read_manifest

    rows = [
        {"slide_id": r["slide_id"], "status": r["status"], "reason": r["reason"]}
        for path in manifests
        for r in read_manifest(path)
    ]
    table = pd.DataFrame(rows, columns=["slide_id", "status", "reason"]).fillna("")
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


def write_status_table_from_feature_index(index_csv: str | Path, out_csv: str | Path) -> pd.DataFrame:
    """The same table for a dataset whose features another tool wrote (datasets.X.features_dir): its
    checked index (slidetrain.wsi.external_features) has a non-empty file for every slide, so every
    slide is ok; the pipeline did not preprocess these slides and excludes none."""
    import pandas as pd

    index = pd.read_csv(index_csv, dtype={"slide_id": str})
    table = pd.DataFrame(
        {"slide_id": index.slide_id, "status": "ok", "reason": ""}, columns=["slide_id", "status", "reason"]
    )
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
