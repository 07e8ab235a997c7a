"""The downloader against local stand-ins with faults: every download ends byte-identical or with a
clear error, and nothing but a complete, verified file ever carries the final name."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakeservers import FakeFile, FakeServer
from slidetrain.data.download import Endpoints, download, exclusion_reason, partial_path
from slidetrain.errors import DownloadError

DATA = os.urandom(3 * (1 << 20) + 12345)  # 3 MiB and a bit: several chunks
MD5 = hashlib.md5(DATA).hexdigest()
FILE_ID = "5b2f1c3e-0000-4000-8000-000000000001"
PATH = f"/data/{FILE_ID}"


def _get(server, tmp_path, **kw):
    kw.setdefault("md5", MD5)
    kw.setdefault("size", len(DATA))
    dest = tmp_path / "slides" / "TCGA-AA-0001-01Z-00-DX1.svs"
    out = download(
        f"gdc:{FILE_ID}",
        dest,
        slide_id="TCGA-AA-0001-01Z-00-DX1",
        retries=kw.pop("retries", 4),
        backoff_s=0.01,
        progress=False,
        endpoints=Endpoints(gdc_api=server.url),
        **kw,
    )
    return dest, out


def _only_final_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "fault",
    [
        {},
        {"drop_after": [1_000_000]},  # connection dropped mid-file
        {"fail_503": 2},
        {"corrupt": 1},  # a wrong md5 once
        {"drop_after": [1_500_000], "ignore_range": True},  # resume asked, server answers 200 in full
    ],
    ids=["clean", "dropped", "503-twice", "wrong-md5-once", "ignores-range"],
)
def test_download_recovers_byte_identical(tmp_path, fault):
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA, **{k: list(v) if isinstance(v, list) else v for k, v in fault.items()})
        dest, out = _get(server, tmp_path)
        ranges = server.ranges(PATH)
    assert out == dest and dest.read_bytes() == DATA
    assert not partial_path(dest).exists()
    if fault.get("drop_after"):
        # resumed from what had arrived (whole chunks, at most the bytes sent), not from zero;
        # with ignore_range the 200 answer is taken from byte 0 (the test's bytes check shows it)
        assert len(ranges) == 2 and ranges[0] is None
        resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
        assert 0 < resumed_at <= fault["drop_after"][0]
    if fault.get("fail_503"):
        assert ranges == [None, None, None]
    if fault.get("corrupt"):
        assert ranges == [None, None]  # the wrong file was thrown away, fetched again from zero


def test_md5_still_wrong_after_retries_is_an_error_naming_the_slide(tmp_path):
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA, corrupt=100)
        with pytest.raises(DownloadError, match=r"TCGA-AA-0001-01Z-00-DX1.*md5 [0-9a-f]{32}, expected " + MD5):
            _get(server, tmp_path, retries=2)
        assert len(server.ranges(PATH)) == 3
    assert list((tmp_path / "slides").iterdir()) == []  # neither the final name nor a partial


def test_connection_always_dropped_is_an_error_and_leaves_no_final_name(tmp_path):
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA, drop_after=[200_000] * 10)
        with pytest.raises(DownloadError, match=r"TCGA-AA-0001-01Z-00-DX1.*after 2 retries"):
            _get(server, tmp_path, retries=2)
        offsets = [int((r or "bytes=0-")[6:-1]) for r in server.ranges(PATH)]
    assert _only_final_files(tmp_path / "slides") == []
    # each attempt resumed where the previous stopped; what arrived is kept for the next attempt
    assert len(offsets) == 3 and offsets[0] == 0 < offsets[1] < offsets[2]
    kept = partial_path(tmp_path / "slides" / "TCGA-AA-0001-01Z-00-DX1.svs").stat().st_size
    assert offsets[2] < kept < len(DATA)


def test_size_mismatch_without_md5_is_caught(tmp_path):
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA[:-10])
        with pytest.raises(DownloadError, match=rf"{len(DATA) - 10} bytes, expected {len(DATA)}"):
            _get(server, tmp_path, md5=None, retries=1)
    assert _only_final_files(tmp_path / "slides") == []


def test_4xx_is_not_retried(tmp_path):
    with FakeServer() as server:
        with pytest.raises(DownloadError, match="404"):
            _get(server, tmp_path)
        assert len(server.requests) == 1


def test_partial_file_from_an_earlier_attempt_is_resumed(tmp_path):
    dest = tmp_path / "slides" / "TCGA-AA-0001-01Z-00-DX1.svs"
    dest.parent.mkdir(parents=True)
    partial_path(dest).write_bytes(DATA[:777_777])
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA)
        _get(server, tmp_path)
        assert server.ranges(PATH) == ["bytes=777777-"]
    assert dest.read_bytes() == DATA


def _cli_download(server_url: str, dest: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "slidetrain.cli",
        "download",
        "--source",
        f"gdc:{FILE_ID}",
        "--out",
        str(dest),
        "--slide-id",
        "slide1",
        "--md5",
        MD5,
        "--size",
        str(len(DATA)),
        "--backoff-s",
        "0.01",
        "--gdc-api",
        server_url,
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())


def test_killed_download_resumes_from_the_partial_file(tmp_path):
    """Kill the downloading process mid-file (SIGKILL, as a killed cluster job), then rerun."""
    dest = tmp_path / "slide1.svs"
    part = partial_path(dest)
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA, delay_s=0.02)  # ~3 MiB/s: the kill lands mid-file
        proc = _cli_download(server.url, dest)
        deadline = time.time() + 60
        while not (part.exists() and part.stat().st_size >= 400_000):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "download never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = part.stat().st_size
        assert 0 < kept < len(DATA) and not dest.exists()
        server.files[PATH].delay_s = 0.0
        rerun = _cli_download(server.url, dest)
        output = rerun.communicate(timeout=60)[0].decode()
        assert rerun.returncode == 0, output
        assert server.ranges(PATH)[-1] == f"bytes={kept}-"
    assert dest.read_bytes() == DATA and not part.exists()


def test_cli_excludes_a_bad_download_with_a_marker_not_slide_bytes(tmp_path):
    dest = tmp_path / "slide1.svs"
    with FakeServer() as server:
        server.files[PATH] = FakeFile(DATA, corrupt=100)
        proc = _cli_download(server.url, dest, "--retries", "1", "--on-bad-slide", "error")
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 2 and "slide1" in out and "md5" in out
        assert not dest.exists()
        proc = _cli_download(server.url, dest, "--retries", "1", "--on-bad-slide", "exclude")
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out
    reason = exclusion_reason(dest)
    assert reason is not None and "md5" in reason and DATA[:100] not in dest.read_bytes()


def test_preprocessing_turns_a_download_marker_into_an_excluded_slide(tmp_path):
    from slidetrain.data.download import write_exclusion_marker
    from slidetrain.errors import SlideError
    from slidetrain.wsi.exclusion import OUTPUT_KEYS, preprocess_or_exclude, read_status

    slide = tmp_path / "s.svs"
    write_exclusion_marker(slide, "s", "md5 0123, expected abcd")
    suffix = {"mask_png": ".png", "qc_path": ".png", "tiles_h5": ".h5", "image_path": ".jpg"}
    outputs = {k: tmp_path / f"out_{k}{suffix.get(k, '.json')}" for k in OUTPUT_KEYS}
    with pytest.raises(SlideError, match="s: not downloaded: s: md5 0123"):
        preprocess_or_exclude(slide, "s", outputs, {}, "error", tmp_path / "status.json")
    preprocess_or_exclude(slide, "s", outputs, {}, "exclude", tmp_path / "status.json")
    status = read_status(tmp_path / "status.json")
    assert status["status"] == "excluded" and "md5 0123" in status["reason"]
