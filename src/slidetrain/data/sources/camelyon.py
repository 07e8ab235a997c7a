"""CAMELYON16 and CAMELYON17 from the public S3 bucket (unsigned requests, no AWS account).

    sheet = camelyon16_sheet(client)   # 399 slides: normal_/tumor_ (train), test_ (labels: reference.csv)
    sheet = camelyon17_sheet(client)   # images/patient_XXX_node_Y.tif with labels in stages.csv

Binary labels (classes [normal, tumor]). CAMELYON16: normal_* -> normal, tumor_* -> tumor, test_*
from evaluation/reference.csv (Normal/Tumor). CAMELYON17 stages.csv gives each slide negative, itc,
micro or macro: negative -> normal; micro, macro -> tumor; itc (isolated tumour cells, < 0.2 mm) ->
`itc_label`, tumor by default (the slide holds metastatic cells). Big-Layers uses Ling et al.
2025's reprocessed binary labels; their exact ITC rule is not in the paper, so both are offered
(`slidetrain sheet camelyon17 --itc-label normal`). Slides without a label in stages.csv are left
out and listed beside the sheet.

Columns beyond the sheet's: official_part (the challenge's train/test), center (CAMELYON17: 20
patients per centre), md5 (the S3 ETag when it is a plain md5, i.e. not a multipart upload).
"""

from __future__ import annotations

import csv
import io
import logging
import re

import pandas as pd

from slidetrain.errors import DownloadError, SheetError

log = logging.getLogger(__name__)

BUCKET = "camelyon-dataset"
C17_STAGE_TO_LABEL = {"negative": "normal", "micro": "tumor", "macro": "tumor"}
C17_TRAIN_PATIENTS = 100  # patients 000-099 form the training set, 100-199 the test set
_C16 = re.compile(r"^(normal|tumor|test)_(\d{3})\.tif$")
_C17 = re.compile(r"^patient_(\d{3})_node_(\d)\.tif$")


def _list(client, bucket: str, prefix: str) -> list[dict]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as err:
        raise DownloadError(f"s3://{bucket}/{prefix}", f"listing failed: {err}") from err


def _read_text(client, bucket: str, key: str) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8-sig")
    except (BotoCoreError, ClientError) as err:
        raise DownloadError(f"s3://{bucket}/{key}", f"cannot read: {err}") from err


def _md5(etag: str) -> str:
    etag = etag.strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) else ""  # multipart ETags ("...-N") are no md5


def _row(obj: dict, bucket: str, slide_id: str, patient: str, label: str, part: str) -> dict:
    return {
        "slide_id": slide_id,
        "patient_id": patient,
        "label": label,
        "source": f"s3://{bucket}/{obj['Key']}",
        "md5": _md5(obj.get("ETag", "")),
        "size": str(obj.get("Size", "")),
        "official_part": part,
    }


def camelyon16_sheet(client, bucket: str = BUCKET, prefix: str = "CAMELYON16/") -> tuple[pd.DataFrame, pd.DataFrame]:
    reference = {}
    for rec in csv.reader(io.StringIO(_read_text(client, bucket, f"{prefix}evaluation/reference.csv"))):
        if rec and rec[0].strip().startswith("test_"):
            reference[rec[0].strip().removesuffix(".tif")] = rec[1].strip().lower()
    rows, left_out = [], []
    for obj in _list(client, bucket, f"{prefix}images/"):
        m = _C16.match(obj["Key"].rsplit("/", 1)[-1])
        if not m:
            continue
        slide_id = f"{m.group(1)}_{m.group(2)}"
        if m.group(1) == "test":
            label = reference.get(slide_id)
            if label not in ("normal", "tumor"):
                left_out.append({"slide_id": slide_id, "reason": f"reference.csv label {label!r}"})
                continue
            part = "test"
        else:
            label, part = m.group(1), "train"
        # One slide per patient in CAMELYON16 (the challenge gives no patient ids).
        rows.append(_row(obj, bucket, slide_id, slide_id, label, part))
    if not rows:
        raise SheetError(f"s3://{bucket}/{prefix}images/ holds no normal_/tumor_/test_NNN.tif slides")
    return pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True), pd.DataFrame(
        left_out, columns=["slide_id", "reason"]
    )


def camelyon17_sheet(
    client, bucket: str = BUCKET, prefix: str = "CAMELYON17/", itc_label: str = "tumor"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if itc_label not in ("normal", "tumor"):
        raise SheetError(f"itc_label = {itc_label!r}; expected normal or tumor")
    mapping = {**C17_STAGE_TO_LABEL, "itc": itc_label}
    stages = {}
    for rec in csv.DictReader(io.StringIO(_read_text(client, bucket, f"{prefix}stages.csv"))):
        name = (rec.get("patient") or rec.get("Patient") or "").strip()
        if name.endswith(".tif"):  # patient rows (patient_000.zip, pN stage) are not slides
            stages[name.removesuffix(".tif")] = (rec.get("stage") or rec.get("Stage") or "").strip().lower()
    rows, left_out = [], []
    for obj in _list(client, bucket, f"{prefix}images/"):
        m = _C17.match(obj["Key"].rsplit("/", 1)[-1])
        if not m:
            continue
        patient_no = int(m.group(1))
        slide_id = f"patient_{m.group(1)}_node_{m.group(2)}"
        stage = stages.get(slide_id)
        if stage not in mapping:
            left_out.append({"slide_id": slide_id, "reason": f"stages.csv stage {stage!r}"})
            continue
        part = "train" if patient_no < C17_TRAIN_PATIENTS else "test"
        row = _row(obj, bucket, slide_id, f"patient_{m.group(1)}", mapping[stage], part)
        rows.append({**row, "stage": stage, "center": str(patient_no // 20 % 5)})
    if not rows:
        raise SheetError(f"s3://{bucket}/{prefix}images/ holds no labelled patient_XXX_node_Y.tif slides")
    if left_out:
        log.warning("camelyon17: %d slide(s) without a usable label left out (listed beside the sheet)", len(left_out))
    return pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True), pd.DataFrame(
        left_out, columns=["slide_id", "reason"]
    )
