"""Slide sheets: every malformed sheet is an error naming what is wrong."""

from __future__ import annotations

import pandas as pd
import pytest

from slidetrain.data.sheet import read_sheet
from slidetrain.errors import SheetError

CLASSES = ["normal", "tumour"]


def write(tmp_path, rows) -> str:
    path = tmp_path / "sheet.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def row(slide, label="normal", source="synthetic", patient=None):
    return {"slide_id": slide, "patient_id": patient or f"p_{slide}", "label": label, "source": source}


def test_valid_sheet_reads(tmp_path, aperio_svs):
    sheet = read_sheet(write(tmp_path, [row("a"), row("b", "tumour", str(aperio_svs))]), CLASSES)
    assert sheet.slide_id.tolist() == ["a", "b"]


def test_missing_file_names_the_slide(tmp_path):
    with pytest.raises(SheetError, match=r"not found.*b ->.*nowhere\.svs"):
        read_sheet(write(tmp_path, [row("a"), row("b", source="nowhere.svs")]), CLASSES)


def test_unknown_label_names_it_and_the_expected_classes(tmp_path):
    with pytest.raises(SheetError, match=r"unknown label.*'tumor'.*expected one of \['normal', 'tumour'\]"):
        read_sheet(write(tmp_path, [row("a"), row("b", "tumor")]), CLASSES)


def test_duplicate_slide_id(tmp_path):
    with pytest.raises(SheetError, match=r"duplicate slide_id.*a \(rows 2, 3\)"):
        read_sheet(write(tmp_path, [row("a"), row("a", patient="q")]), CLASSES)


def test_missing_column_and_bad_id(tmp_path):
    path = tmp_path / "s.tsv"
    pd.DataFrame([{"slide_id": "a", "label": "normal", "source": "synthetic"}]).to_csv(path, sep="\t", index=False)
    with pytest.raises(SheetError, match=r"missing column.*patient_id"):
        read_sheet(path, CLASSES)
    with pytest.raises(SheetError, match="not usable as file names"):
        read_sheet(write(tmp_path, [row("a/b")]), CLASSES)


def test_committed_synthetic_sheet_is_the_generators_output():
    from pathlib import Path

    from slidetrain.wsi.synthetic import synthetic_sheet

    committed = pd.read_csv(Path(__file__).resolve().parents[1] / "config/sheets/synthetic.tsv", sep="\t", dtype=str)
    regenerated = synthetic_sheet(len(committed), seed=0).astype(str)
    pd.testing.assert_frame_equal(committed, regenerated.reset_index(drop=True))
