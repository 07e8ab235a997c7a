"""Slide sheets: one row per slide (slide_id, patient_id, label, source).

`source` says where the slide comes from: `synthetic` (the pipeline draws it),
or a path to a local slide file (absolute, or relative to the sheet's folder).
Download sources (gdc:, s3:, kaggle:) belong to the download stage.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from slidetrain.errors import SheetError

COLUMNS = ("slide_id", "patient_id", "label", "source")
# Optional columns checked when present (sheets built from a source carry them); others pass through.
MD5_PATTERN = re.compile(r"^([0-9a-fA-F]{32})?$")
SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # safe as a file name and a wildcard
SYNTHETIC = "synthetic"


def read_sheet(path: str | Path, class_names: list[str], check_files: bool = True) -> pd.DataFrame:
    """Read and validate a sheet; every problem is a SheetError naming the sheet, row and value."""
    path = Path(path)
    if not path.exists():
        raise SheetError(f"sheet {path}: file not found")
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    try:
        sheet = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise SheetError(f"sheet {path}: cannot be parsed as {'TSV' if sep == chr(9) else 'CSV'}: {err}") from err
    return validate_sheet(sheet, class_names, where=str(path), base_dir=path.parent, check_files=check_files)


def validate_sheet(
    sheet: pd.DataFrame,
    class_names: list[str],
    where: str = "sheet",
    base_dir: Path | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in sheet.columns]
    if missing:
        raise SheetError(f"{where}: missing column(s) {missing}; expected columns {list(COLUMNS)}")
    sheet = sheet.copy()  # extra columns (md5, size, data_provider, official_part, ...) pass through
    for col in COLUMNS:
        sheet[col] = sheet[col].astype(str).str.strip()
        empty = sheet.index[sheet[col] == ""].tolist()
        if empty:
            raise SheetError(
                f"{where}: empty {col!r} in row(s) {[i + 2 for i in empty[:10]]} (1-based, header = row 1)"
            )
    bad_ids = [s for s in sheet.slide_id if not SLIDE_ID_PATTERN.match(s)]
    if bad_ids:
        raise SheetError(
            f"{where}: slide_id(s) {bad_ids[:10]} are not usable as file names; "
            "expected letters, digits, '.', '_' or '-'"
        )
    dup = sheet.slide_id[sheet.slide_id.duplicated(keep=False)]
    if len(dup):
        rows = [f"{s} (rows {', '.join(str(i + 2) for i in dup.index[dup == s])})" for s in dup.unique()[:10]]
        raise SheetError(
            f"{where}: duplicate slide_id(s) {rows} (1-based, header = row 1); each slide must appear once"
        )
    for col, ok, expected in (
        ("md5", lambda v: bool(MD5_PATTERN.match(v)), "32 hex digits or empty"),
        ("size", lambda v: v == "" or v.isdigit(), "a byte count or empty"),
    ):
        if col in sheet.columns:
            values = sheet[col].astype(str).str.strip()
            bad = sheet.index[~values.map(ok)].tolist()
            if bad:
                raise SheetError(f"{where}: bad {col!r} in row(s) {[i + 2 for i in bad[:10]]}; expected {expected}")
            sheet[col] = values
    unknown = sorted(set(sheet.label) - set(class_names))
    if unknown:
        rows = sheet.slide_id[sheet.label.isin(unknown)].tolist()[:5]
        raise SheetError(
            f"{where}: unknown label(s) {unknown} (e.g. slides {rows}); "
            f"expected one of {class_names} (config key classes)"
        )
    if check_files:
        missing_files = []
        for slide_id, source in zip(sheet.slide_id, sheet.source, strict=True):
            if source == SYNTHETIC or ":" in source.split("/")[0]:
                continue  # drawn or downloaded by the pipeline
            p = local_path(source, base_dir)
            if not p.exists():
                missing_files.append(f"{slide_id} -> {p}")
        if missing_files:
            raise SheetError(
                f"{where}: slide file(s) not found: {missing_files[:10]}" + (" ..." if len(missing_files) > 10 else "")
            )
    return sheet.reset_index(drop=True)


def local_path(source: str, base_dir: Path | None) -> Path:
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def class_index(sheet: pd.DataFrame, class_names: list[str]) -> dict[str, int]:
    """slide_id -> class index in `class_names` order (the order is the ordinal order for graded tasks)."""
    lookup = {name: i for i, name in enumerate(class_names)}
    return {s: lookup[label] for s, label in zip(sheet.slide_id, sheet.label, strict=True)}


def relabel(sheet: pd.DataFrame, label_map: dict[str, str]) -> pd.DataFrame:
    """A derived dataset's sheet: the same slides with labels mapped (e.g. graded -> binary)."""
    unmapped = sorted(set(sheet.label) - set(label_map))
    if unmapped:
        raise SheetError(f"label_map has no target for label(s) {unmapped}; expected every label of the sheet")
    return sheet.assign(label=sheet.label.map(label_map))
