"""HTML pages of Snakemake's report (report_html.py): tables rendered, excluded slides' QC pictures embedded."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from slidetrain.errors import SlideError
from slidetrain.report_html import write_excluded_pictures, write_table_html
from slidetrain.wsi.exclusion import write_placeholders


def test_a_table_page_holds_every_cell(tmp_path):
    table = pd.DataFrame({"method": ["local_k4", "e2e<b>"], "auroc": [0.91449, np.nan], "n_seeds": [1, 2]})
    write_table_html(table, tmp_path / "t.html", "Table 1")
    text = (tmp_path / "t.html").read_text()
    cells = re.findall(r"<td>(.*?)</td>", text)
    assert cells == ["local_k4", "0.9145", "1", "e2e&lt;b&gt;", "", "2"]  # NaN empty, markup escaped
    assert re.findall(r"<th>(.*?)</th>", text) == ["method", "auroc", "n_seeds"]


def _status(tmp_path, rows):
    path = tmp_path / "status.csv"
    pd.DataFrame(rows, columns=["slide_id", "status", "reason"]).to_csv(path, index=False)
    return path


def test_the_qc_page_embeds_the_pictures_of_excluded_slides_only(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    outputs = {
        "mask_png": masks / "s1.mask.png",
        "qc_path": masks / "s1.qc.jpg",
        "tiles_h5": tmp_path / "s1.h5",
        "image_path": tmp_path / "s1.jpg",
        "image_meta_json": tmp_path / "s1.json",
        "timings_json": tmp_path / "s1.t.json",
    }
    write_placeholders("s1", outputs, "no tissue found")
    (masks / "s0.qc.jpg").write_bytes(b"not this one")
    status = _status(tmp_path, [("s0", "ok", ""), ("s1", "excluded", "no tissue found")])
    assert write_excluded_pictures(status, masks, tmp_path / "qc.html", "synthetic") == 1
    text = (tmp_path / "qc.html").read_text()
    images = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", text)
    assert [base64.b64decode(i) for i in images] == [(masks / "s1.qc.jpg").read_bytes()]
    assert "no tissue found" in text and "1 of 2 slides excluded" in text


def test_the_qc_page_says_when_none_was_excluded(tmp_path):
    status = _status(tmp_path, [("s0", "ok", "")])
    assert write_excluded_pictures(status, tmp_path, tmp_path / "qc.html", "synthetic") == 0
    assert "No slide was excluded" in (tmp_path / "qc.html").read_text()


def test_a_missing_picture_names_the_slide(tmp_path):
    status = _status(tmp_path, [("s9", "excluded", "unreadable")])
    with pytest.raises(SlideError, match="s9"):
        write_excluded_pictures(status, tmp_path, tmp_path / "qc.html", "synthetic")
