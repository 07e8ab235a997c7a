"""Heatmaps of every test slide of one run, and the report gallery over methods.

`heatmaps_for_run` takes the run's attention.h5 and predictions.csv and the split's test part:
every test slide must have attention (a missing one is an error naming the slide, never a
skip). It writes {out_dir}/{slide}.png and .csv per slide and {out_dir}/index.csv.
`write_gallery` puts the index rows and the PNGs of several methods on one HTML page.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd

from slidetrain.data.sheet import SYNTHETIC, local_path
from slidetrain.errors import ConfigError, SlideError
from slidetrain.io import atomic_path
from slidetrain.wsi.heatmaps import INDEX_COLUMNS, SlideInputs, slide_heatmap

log = logging.getLogger(__name__)


def sheet_slide_paths(sheet_csv: Path, slides_dir: Path) -> dict[str, tuple[Path, bool]]:
    """slide_id -> (slide file, drawn by the pipeline): synthetic slides live in `slides_dir`."""
    sep = "\t" if Path(sheet_csv).suffix in (".tsv", ".txt") else ","
    sheet = pd.read_csv(sheet_csv, sep=sep, dtype=str, keep_default_na=False)
    missing = [c for c in ("slide_id", "source") if c not in sheet.columns]
    if missing:
        raise ConfigError(f"slide sheet {sheet_csv} lacks column(s) {missing}; expected slide_id and source")
    out = {}
    for sid, source in zip(sheet.slide_id, sheet.source, strict=True):
        drawn = source == SYNTHETIC
        out[sid] = (Path(slides_dir) / f"{sid}.tiff" if drawn else local_path(source, Path(sheet_csv).parent), drawn)
    return out


def test_slides(split_csv: Path) -> list[str]:
    from slidetrain.data.splits import read_split

    split = read_split(split_csv, allow_external=True)
    ids = split.loc[split.part == "test", "slide_id"].tolist()
    if not ids:
        raise ConfigError(f"split {split_csv} has no test slides; heatmaps are drawn for the test part")
    return ids


def heatmaps_for_run(
    attention_h5: Path,
    method: str,
    split_csv: Path,
    sheet_csv: Path,
    slides_dir: Path,
    tiles_dir: Path,
    masks_dir: Path,
    out_dir: Path,
    index_csv: Path,
    predictions_csv: Path | None = None,
    class_names: list[str] | None = None,
    truth_dir: Path | None = None,
    max_px: int = 1024,
    mpp_fallback: float | None = None,
) -> pd.DataFrame:
    """Heatmap PNG + per-tile CSV of every test slide of the run; the index table (also written)."""
    paths = sheet_slide_paths(sheet_csv, slides_dir)
    pred = pd.read_csv(predictions_csv, dtype={"slide_id": str}).set_index("slide_id") if predictions_csv else None
    rows = []
    for sid in test_slides(split_csv):
        if sid not in paths:
            raise SlideError(sid, f"is in the split {split_csv} but not in the slide sheet {sheet_csv}")
        slide_path, drawn = paths[sid]
        truth = Path(truth_dir) / f"{sid}.truth.npz" if truth_dir is not None and drawn else None
        inputs = SlideInputs(sid, slide_path, Path(tiles_dir) / f"{sid}.h5", Path(masks_dir) / f"{sid}.mask.png", truth)
        label = predicted = ""
        branch = None
        if pred is not None:
            if sid not in pred.index:
                raise SlideError(sid, f"has no row in {predictions_csv}; expected every test slide there")
            label, predicted = str(pred.at[sid, "label"]), str(pred.at[sid, "predicted"])
            if class_names and predicted in class_names:  # multi-branch attention: the predicted class's branch
                branch = class_names.index(predicted)
        extra = f"; truth {label}, predicted {predicted}" if pred is not None else ""
        out_png, out_csv = Path(out_dir) / f"{sid}.png", Path(out_dir) / f"{sid}.csv"
        row = slide_heatmap(
            inputs,
            Path(attention_h5),
            method,
            out_png,
            out_csv,
            branch=branch,
            title_extra=extra,
            max_px=max_px,
            mpp_fallback=mpp_fallback,
        )
        multi_branch = row.pop("n_branches") > 1  # the class whose branch is drawn: only then is there a choice
        row.update(
            png=out_png.name,
            csv=out_csv.name,
            label=label,
            predicted=predicted,
            branch=class_names[branch] if branch is not None and multi_branch else "",
        )
        rows.append(row)
        log.info("%s %s: %d tiles, %.2f s", method, sid, row["n_tiles"], row["seconds"])
    index = pd.DataFrame(rows)[list(INDEX_COLUMNS)]
    with atomic_path(index_csv) as tmp:
        index.to_csv(tmp, index=False, float_format="%.4g")
    return index


def write_gallery(index_csvs: list[Path], out_html: Path, title: str) -> int:
    """One page: per method, its index table and every slide's heatmap (embedded); returns the picture count."""
    from slidetrain.report_html import embedded_image, page, table_body

    parts, n = [], 0
    for index_csv in index_csvs:
        index = pd.read_csv(index_csv, dtype={"slide_id": str, "label": str, "predicted": str})
        method = str(index.method.iloc[0]) if len(index) else Path(index_csv).parent.name
        parts.append(f"<h4>{html.escape(method)}</h4>")
        parts.append(
            table_body(
                index[
                    [
                        "slide_id",
                        "label",
                        "predicted",
                        "n_tiles",
                        "lesion_auroc",
                        "scaled_on_lesion",
                        "scaled_off_lesion",
                    ]
                ]
            )
        )
        for sid, png in zip(index.slide_id, index.png, strict=True):
            picture = Path(index_csv).parent / png
            if not picture.is_file():
                raise SlideError(sid, f"heatmap {picture} listed in {index_csv} does not exist")
            parts.append(f"<figure>{embedded_image(picture, sid)}<figcaption>{html.escape(sid)}</figcaption></figure>")
            n += 1
    with atomic_path(out_html) as tmp:
        tmp.write_text(page(title, "\n".join(parts)))
    return n
