"""Self-contained HTML pages for Snakemake's report: a table rendered, pictures embedded.

Snakemake's report shows an HTML item in the page (a CSV only as a download), so each paper
table also gets an .html copy (`write_table_html`), and the QC pictures of a dataset's excluded
slides one page (`write_excluded_pictures`). Pictures are embedded as base64 data, so a page
needs no file beside it.
"""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.errors import SlideError
from slidetrain.io import atomic_path

STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
    "td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:0.5em}"
    "img{max-width:640px;border:1px solid #bbb}"
)


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body><h3>{html.escape(title)}</h3>\n{body}\n</body></html>\n"
    )


def table_body(table: pd.DataFrame) -> str:
    """An HTML <table> of `table`: floats with 4 decimals, NaN as an empty cell."""

    def cell(v: object) -> str:
        if isinstance(v, float | np.floating):
            return "" if np.isnan(v) else f"{v:.4f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>\n" for row in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody></table>"


def write_table_html(table: pd.DataFrame, out_html: str | Path, title: str) -> None:
    with atomic_path(out_html) as tmp:
        tmp.write_text(page(title, table_body(table)))


def embedded_image(path: str | Path, alt: str) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "image/jpeg"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img src='data:{mime};base64,{data}' alt='{html.escape(alt)}'>"


def write_excluded_pictures(
    status_csv: str | Path,
    pictures_dir: str | Path,
    out_html: str | Path,
    dataset: str,
    suffix: str = ".qc.jpg",
) -> int:
    """One page with the QC picture ({pictures_dir}/{slide}{suffix}) and reason of every slide that
    `status_csv` (results/{dataset}/qc/status.csv) marks excluded; returns their count.

    A page with none says how many slides passed. A missing picture is an error naming the slide:
    preprocessing writes one for every slide, excluded or not."""
    from slidetrain.wsi.exclusion import read_status_table

    table = read_status_table(status_csv)
    excluded = table[table.status == "excluded"]
    figures = []
    for slide_id, reason in zip(excluded.slide_id, excluded.reason, strict=True):
        picture = Path(pictures_dir) / f"{slide_id}{suffix}"
        if not picture.is_file():
            raise SlideError(slide_id, f"QC picture {picture} is missing; run the preprocess rule first")
        figures.append(
            f"<figure>{embedded_image(picture, slide_id)}<figcaption><b>{html.escape(slide_id)}</b>: "
            f"{html.escape(reason)}</figcaption></figure>"
        )
    summary = f"<p>{len(excluded)} of {len(table)} slides excluded; {len(table) - len(excluded)} passed QC.</p>"
    body = summary + ("\n".join(figures) if figures else "<p>No slide was excluded.</p>")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page(f"{dataset}: QC pictures of the excluded slides", body))
    return len(excluded)
