"""Sheets from the sources, against local stand-ins: the GDC files endpoint, CAMELYON's S3 bucket
(moto's server mode), Kaggle's competition data endpoint; and downloads through each."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import zipfile

import pandas as pd
import pytest

from fakeservers import FakeFile, FakeServer
from slidetrain.cli import main
from slidetrain.data.download import Endpoints, download, partial_path
from slidetrain.data.sheet import read_sheet
from slidetrain.errors import DownloadError

# ------------------------------------------------------------------------------------------ GDC


def _gdc_hit(i: int, project: str, gleason=None) -> dict:
    barcode = f"TCGA-{10 + i:02d}-{1000 + i:04d}-01Z-00-DX1"
    case = {"submitter_id": barcode[:12], "project": {"project_id": project}}
    if gleason:
        case["diagnoses"] = [
            {"primary_gleason_grade": f"Pattern {gleason[0]}", "secondary_gleason_grade": f"Pattern {gleason[1]}"}
        ]
    return {
        "file_id": f"00000000-0000-4000-8000-{i:012d}",
        "file_name": f"{barcode}.abcdef{i:02d}.svs",
        "md5sum": hashlib.md5(str(i).encode()).hexdigest(),
        "file_size": 1000 + i,
        "cases": [case],
    }


def _gdc_route(hits):
    def route(query):
        start, size = int(query["from"][0]), int(query["size"][0])
        page = hits[start : start + size]
        return 200, {"data": {"hits": page, "pagination": {"total": len(hits), "from": start, "count": len(page)}}}

    return route


def test_gdc_sheet_queries_diagnostic_open_svs_and_pages(tmp_path):
    hits = [_gdc_hit(i, "TCGA-LUAD" if i % 2 else "TCGA-LUSC") for i in range(7)]
    with FakeServer() as server:
        server.json_routes["/files"] = _gdc_route(hits)
        import slidetrain.data.sources.gdc as gdc

        sheet, _ = _with_page_size(gdc, server.url, 3)
        queries = [r["query"] for r in server.requests]
    assert len(queries) == 3 and [q["from"][0] for q in queries] == ["0", "3", "6"]
    filters = json.loads(queries[0]["filters"][0])
    content = {c["content"]["field"]: c["content"]["value"] for c in filters["content"]}
    assert content == {
        "cases.project.project_id": ["TCGA-LUAD", "TCGA-LUSC"],
        "data_format": "SVS",
        "data_type": "Slide Image",
        "experimental_strategy": "Diagnostic Slide",
        "access": "open",
    }
    assert set(queries[0]["fields"][0].split(",")) >= {
        "file_id",
        "file_name",
        "md5sum",
        "file_size",
        "cases.submitter_id",
    }
    assert len(sheet) == 7
    row = sheet[sheet.slide_id == "TCGA-11-1001-01Z-00-DX1.abcdef01"].iloc[0]
    assert (row.patient_id, row.label, row.source) == (
        "TCGA-11-1001",
        "LUAD",
        "gdc:00000000-0000-4000-8000-000000000001",
    )
    assert row.md5 == hashlib.md5(b"1").hexdigest() and row["size"] == "1001"


def _with_page_size(gdc, url, page_size):
    original = gdc.query_files

    def paged(filters, fields, api, session):
        return original(filters, fields, api, session, page_size=page_size)

    gdc.query_files, saved = paged, gdc.query_files
    try:
        return gdc.gdc_sheet("tcga_nsclc", api=url)
    finally:
        gdc.query_files = saved


def test_sheet_command_for_tcga_prad_derives_isup_and_lists_slides_without_grades(tmp_path):
    hits = [
        _gdc_hit(0, "TCGA-PRAD", (3, 4)),
        _gdc_hit(1, "TCGA-PRAD", (4, 3)),
        _gdc_hit(2, "TCGA-PRAD", (5, 5)),
        _gdc_hit(3, "TCGA-PRAD"),
    ]
    out = tmp_path / "tcga_prad.tsv"
    with FakeServer() as server:
        server.json_routes["/files"] = _gdc_route(hits)
        assert main(["sheet", "tcga_prad", "--gdc-api", server.url, "--out", str(out)]) == 0
    sheet = read_sheet(out, ["isup1", "isup2", "isup3", "isup4", "isup5"], check_files=False)
    assert sheet.label.tolist() == ["isup2", "isup3", "isup5"]
    left_out = pd.read_csv(tmp_path / "tcga_prad.left_out.tsv", sep="\t")
    assert left_out.slide_id.tolist() == ["TCGA-13-1003-01Z-00-DX1.abcdef03"]


def test_gdc_slide_downloads_from_the_data_endpoint(tmp_path):
    data = os.urandom(200_000)
    with FakeServer() as server:
        server.files["/data/abc-123"] = FakeFile(data, drop_after=[70_000])
        download(
            "gdc:abc-123",
            tmp_path / "s.svs",
            slide_id="s",
            md5=hashlib.md5(data).hexdigest(),
            size=len(data),
            backoff_s=0.01,
            progress=False,
            endpoints=Endpoints(gdc_api=server.url),
        )
    assert (tmp_path / "s.svs").read_bytes() == data


# ------------------------------------------------------------------------------- CAMELYON / S3


@pytest.fixture(scope="module")
def s3():
    """moto's S3 in server mode on 127.0.0.1, a bucket laid out as the public CAMELYON bucket."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    owner = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    owner.create_bucket(Bucket="camelyon-dataset")
    owner.put_bucket_policy(
        Bucket="camelyon-dataset",
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": ["s3:GetObject", "s3:ListBucket"],
                        "Resource": ["arn:aws:s3:::camelyon-dataset", "arn:aws:s3:::camelyon-dataset/*"],
                    }
                ],
            }
        ),
    )
    blobs = {}
    for name in ["normal_001", "normal_002", "tumor_001", "test_001", "test_002"]:
        blobs[f"CAMELYON16/images/{name}.tif"] = os.urandom(50_000)
    for p in (0, 1, 100):
        for node in range(5):
            blobs[f"CAMELYON17/images/patient_{p:03d}_node_{node}.tif"] = os.urandom(20_000)
    blobs["CAMELYON16/evaluation/reference.csv"] = b"test_001,Tumor,Micro,Primary\ntest_002,Normal,,\n"
    stages = ["patient,stage", "patient_000.zip,pN1"]
    stages += [f"patient_000_node_{n}.tif,{s}" for n, s in enumerate(["negative", "itc", "micro", "macro", "negative"])]
    stages += [f"patient_001_node_{n}.tif,negative" for n in range(5)]
    stages += [f"patient_100_node_{n}.tif,{'macro' if n == 2 else 'negative'}" for n in range(4)]  # node_4: no label
    blobs["CAMELYON17/stages.csv"] = ("\n".join(stages) + "\n").encode()
    blobs["CAMELYON17/images/readme.txt"] = b"not a slide"
    for key, body in blobs.items():
        owner.put_object(Bucket="camelyon-dataset", Key=key, Body=body)
    yield url, blobs
    server.stop()


def test_camelyon16_sheet_from_s3_unsigned(s3, tmp_path):
    url, blobs = s3
    out = tmp_path / "camelyon16.tsv"
    assert main(["sheet", "camelyon16", "--s3-endpoint", url, "--out", str(out)]) == 0
    sheet = read_sheet(out, ["normal", "tumor"], check_files=False)
    assert dict(zip(sheet.slide_id, sheet.label, strict=True)) == {
        "normal_001": "normal",
        "normal_002": "normal",
        "tumor_001": "tumor",
        "test_001": "tumor",
        "test_002": "normal",
    }
    assert sheet.set_index("slide_id").official_part.to_dict()["test_001"] == "test"
    row = sheet.set_index("slide_id").loc["tumor_001"]
    assert row.source == "s3://camelyon-dataset/CAMELYON16/images/tumor_001.tif"
    assert row.md5 == hashlib.md5(blobs["CAMELYON16/images/tumor_001.tif"]).hexdigest()


@pytest.mark.parametrize("itc_label", ["tumor", "normal"])
def test_camelyon17_sheet_maps_stages_to_binary_and_writes_the_official_split(s3, tmp_path, itc_label):
    url, _ = s3
    out = tmp_path / "camelyon17.tsv"
    assert (
        main(["sheet", "camelyon17", "--s3-endpoint", url, "--out", str(out), "--itc-label", itc_label, "--n-val", "5"])
        == 0
    )
    sheet = read_sheet(out, ["normal", "tumor"], check_files=False).set_index("slide_id")
    assert sheet.loc["patient_000_node_1", "label"] == itc_label  # itc
    assert sheet.loc["patient_000_node_2", "label"] == "tumor" and sheet.loc["patient_000_node_0", "label"] == "normal"
    assert sheet.loc["patient_100_node_2", "official_part"] == "test"
    assert "patient_100_node_4" not in sheet.index  # no label: left out, on record
    assert pd.read_csv(tmp_path / "camelyon17.left_out.tsv", sep="\t").slide_id.tolist() == ["patient_100_node_4"]
    split = pd.read_csv(tmp_path / "camelyon17.official.csv").set_index("slide_id")
    assert (split.part == "val").sum() == 5  # one whole patient of 5 slides
    assert split.loc[split.part == "val", "patient_id"].nunique() == 1
    assert set(split.loc[split.part == "test"].index) == {f"patient_100_node_{n}" for n in range(4)}


def test_s3_download_unsigned_resumes_and_verifies(s3, tmp_path, caplog):
    url, blobs = s3
    key = "CAMELYON16/images/normal_002.tif"
    data = blobs[key]
    dest = tmp_path / "normal_002.tif"
    partial_path(dest).write_bytes(data[:12_345])
    download(
        f"s3://camelyon-dataset/{key}",
        dest,
        slide_id="normal_002",
        md5=hashlib.md5(data).hexdigest(),
        size=len(data),
        progress=False,
        endpoints=Endpoints(s3_endpoint=url),
    )
    assert dest.read_bytes() == data
    assert "restarting" not in caplog.text  # S3 answered the range with 206: resumed, not restarted
    with pytest.raises(DownloadError, match=r"normal_001.*md5.*expected 0{32}"):
        download(
            "s3://camelyon-dataset/CAMELYON16/images/normal_001.tif",
            tmp_path / "normal_001.tif",
            slide_id="normal_001",
            md5="0" * 32,
            retries=1,
            backoff_s=0.01,
            progress=False,
            endpoints=Endpoints(s3_endpoint=url),
        )
    assert not (tmp_path / "normal_001.tif").exists()


# -------------------------------------------------------------------------------------- Kaggle

COMP = "prostate-cancer-grade-assessment"
TRAIN_CSV = (
    b"image_id,data_provider,isup_grade,gleason_score\n"
    b"0005f7aaab2800f6170c399693a96917,karolinska,0,0+0\n"
    b"000920ad0b612851f8e01bcc880d9b3d,karolinska,0,0+0\n"
    b"0018ae58b01bdadc8e347995b69f99aa,radboud,4,4+4\n"
    b"001c62abd11fa4b57bf7a6c603a11bb9,karolinska,4,4+4\n"
)


@pytest.fixture
def kaggle(monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    with FakeServer() as server:
        server.auth_required = "Basic " + base64.b64encode(b"someone:secret").decode()
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as z:  # Kaggle wraps larger files in a zip
            z.writestr("train.csv", TRAIN_CSV)
        server.files[f"/competitions/data/download/{COMP}/train.csv"] = FakeFile(zipped.getvalue())
        yield server


def test_panda_sheet_through_the_kaggle_api(kaggle, tmp_path):
    out = tmp_path / "panda.tsv"
    assert main(["sheet", "panda", "--kaggle-api", kaggle.url, "--out", str(out)]) == 0
    sheet = read_sheet(out, [f"isup{i}" for i in range(6)], check_files=False)
    assert sheet.label.tolist() == ["isup0", "isup0", "isup4", "isup4"]
    assert sheet.data_provider.tolist() == ["karolinska", "karolinska", "radboud", "karolinska"]
    assert sheet.source[2] == f"kaggle:{COMP}/train_images/0018ae58b01bdadc8e347995b69f99aa.tiff"
    assert (sheet.patient_id == sheet.slide_id).all()


def test_kaggle_403_says_to_accept_the_rules(kaggle, tmp_path, capsys):
    kaggle.forbidden = True
    assert main(["sheet", "panda", "--kaggle-api", kaggle.url, "--out", str(tmp_path / "p.tsv")]) == 2
    err = capsys.readouterr().err
    assert "403" in err and f"https://www.kaggle.com/competitions/{COMP}/rules" in err and "Accept" in err
    with pytest.raises(DownloadError, match="403.*accept the rules"):
        download(
            f"kaggle:{COMP}/train_images/x.tiff",
            tmp_path / "x.tiff",
            slide_id="x",
            progress=False,
            endpoints=Endpoints(kaggle_api=kaggle.url),
        )


def test_kaggle_without_credentials_says_where_to_put_them(kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    assert main(["sheet", "panda", "--kaggle-api", kaggle.url, "--out", str(tmp_path / "p.tsv")]) == 2
    err = capsys.readouterr().err
    assert "KAGGLE_USERNAME" in err and "kaggle.json" in err
    assert kaggle.requests == []  # nothing was sent without credentials
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "someone", "key": "secret"}')
    assert main(["sheet", "panda", "--kaggle-api", kaggle.url, "--out", str(tmp_path / "p.tsv")]) == 0


def test_kaggle_slide_download_with_auth_and_resume(kaggle, tmp_path):
    data = os.urandom(300_000)
    kaggle.files[f"/competitions/data/download/{COMP}/train_images/abc.tiff"] = FakeFile(data, drop_after=[100_000])
    download(
        f"kaggle:{COMP}/train_images/abc.tiff",
        tmp_path / "abc.tiff",
        slide_id="abc",
        backoff_s=0.01,
        progress=False,
        endpoints=Endpoints(kaggle_api=kaggle.url),
    )
    assert (tmp_path / "abc.tiff").read_bytes() == data
    assert kaggle.ranges(f"/competitions/data/download/{COMP}/train_images/abc.tiff")[1].startswith("bytes=")
