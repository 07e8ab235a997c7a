"""Resumable, verified slide downloads (GDC data endpoint, public S3, Kaggle, plain HTTP).

    download("gdc:2d3c...", "resources/tcga_nsclc/slides/TCGA-...svs", slide_id="TCGA-...",
             md5="0f3a...", size=1234567)

The bytes go to a hidden partial file beside the destination (`.NAME.part`)
that survives a killed job, so the next attempt or a rerun continues from it
with an HTTP Range request. A server that does not answer 206 with the asked
range (it ignores Range) makes the download restart from zero. Dropped
connections and 5xx answers are retried with exponential backoff. The
destination name appears only after the file is complete and its size and
md5 match the sheet; a file that still mismatches after the retries is a
DownloadError naming the slide, and nothing is left under the final name.

Sources (the sheet's `source` column):
- `gdc:{file_id}`                      GDC data endpoint, `{gdc_api}/data/{file_id}`
- `s3://{bucket}/{key}`                S3 with unsigned requests (public buckets, CAMELYON)
- `kaggle:{competition}/{file path}`   Kaggle's competition data endpoint, the user's credentials
- `http://...`, `https://...`          any server
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slidetrain.errors import DownloadError

log = logging.getLogger(__name__)

GDC_API = "https://api.gdc.cancer.gov"
KAGGLE_API = "https://www.kaggle.com/api/v1"
# Network reads: a dropped connection loses the chunk in flight, so keep it small.
CHUNK_BYTES = 1 << 16
# Magic first line of the marker a download excluded with on_bad_slide: exclude leaves (see below).
EXCLUDED_MARKER = b"slidetrain: download excluded\n"


@dataclass(frozen=True)
class Endpoints:
    """Base addresses of the services; tests and mirrors point them elsewhere."""

    gdc_api: str = GDC_API
    kaggle_api: str = KAGGLE_API
    s3_endpoint: str | None = None  # None = AWS

    @classmethod
    def from_env(cls, **overrides: str | None) -> Endpoints:
        """Defaults, then SLIDETRAIN_GDC_API / SLIDETRAIN_KAGGLE_API / SLIDETRAIN_S3_ENDPOINT, then overrides."""
        values = {
            "gdc_api": os.environ.get("SLIDETRAIN_GDC_API", GDC_API),
            "kaggle_api": os.environ.get("SLIDETRAIN_KAGGLE_API", KAGGLE_API),
            "s3_endpoint": os.environ.get("SLIDETRAIN_S3_ENDPOINT") or None,
        }
        values.update({k: v for k, v in overrides.items() if v})
        return cls(**values)


class Transient(Exception):
    """A failure worth retrying (dropped connection, 5xx, short body)."""


class RangeRejected(Exception):
    """The server refused the asked range (416): the partial file is discarded."""


@dataclass
class Reply:
    """An open answer: where its bytes start in the file, the file's total size if known, the bytes."""

    start: int
    total: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None]


Fetcher = Callable[[int], Reply]  # offset -> reply (raises Transient, RangeRejected or DownloadError)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


# ---------------------------------------------------------------------------------------- HTTP


def http_fetcher(url: str, what: str, session=None, auth=None, hint_403: str = "") -> Fetcher:
    import requests

    session = session or requests.Session()

    def fetch(offset: int) -> Reply:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            r = session.get(url, headers=headers, stream=True, timeout=(15, 120), auth=auth)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise Transient(f"connection to {url} failed: {err}") from err
        if r.status_code == 416:
            r.close()
            raise RangeRejected(f"server refused range bytes={offset}-")
        if r.status_code >= 500 or r.status_code == 429:
            r.close()
            raise Transient(f"{url} answered {r.status_code} {r.reason}")
        if r.status_code in (401, 403):
            r.close()
            raise DownloadError(what, f"{url} answered {r.status_code} {r.reason}. {hint_403}".strip())
        if r.status_code not in (200, 206):
            r.close()
            raise DownloadError(what, f"{url} answered {r.status_code} {r.reason}; expected 200 or 206")
        length = r.headers.get("Content-Length")
        if r.status_code == 206:
            parsed = _parse_content_range(r.headers.get("Content-Range"))
            if parsed is None:
                r.close()
                raise Transient(f"206 answer without a usable Content-Range ({r.headers.get('Content-Range')!r})")
            start, total = parsed
        else:
            start, total = 0, int(length) if length else None

        def chunks() -> Iterator[bytes]:
            try:
                yield from r.iter_content(CHUNK_BYTES)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as err:
                raise Transient(f"connection dropped: {err}") from err

        return Reply(start, total, chunks(), r.close)

    return fetch


# ------------------------------------------------------------------------------------------ S3


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client that signs nothing (public buckets need no credentials) and retries nothing
    itself (the downloader's retry loop owns backoff and resumption)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        signature_version=UNSIGNED,
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=15,
        read_timeout=120,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config, region_name="us-east-1")


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise DownloadError(url, "expected s3://BUCKET/KEY")
    return bucket, key


def s3_fetcher(url: str, what: str, client) -> Fetcher:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(url)

    def fetch(offset: int) -> Reply:
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            obj = client.get_object(Bucket=bucket, Key=key, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "InvalidRange" or status == 416:
                raise RangeRejected(f"S3 refused range bytes={offset}-") from err
            if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
                raise Transient(f"{url}: {code or status}") from err
            raise DownloadError(what, f"{url}: S3 answered {status} {code}: {err}") from err
        except BotoCoreError as err:  # connection refused/closed, timeouts
            raise Transient(f"{url}: {err}") from err
        status = obj["ResponseMetadata"]["HTTPStatusCode"]
        if status == 206:
            parsed = _parse_content_range(obj.get("ContentRange"))
            if parsed is None:
                raise Transient(f"{url}: 206 answer without a usable Content-Range")
            start, total = parsed
        else:
            start, total = 0, obj.get("ContentLength")
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            except BotoCoreError as err:
                raise Transient(f"{url}: connection dropped: {err}") from err

        return Reply(start, total, chunks(), body.close)

    return fetch


# -------------------------------------------------------------------------------------- Kaggle


def kaggle_credentials() -> tuple[str, str]:
    """(username, key) from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json, as the Kaggle CLI finds them."""
    import json

    user, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if user and key:
        return user, key
    dirs = [os.environ.get("KAGGLE_CONFIG_DIR"), "~/.kaggle", "~/.config/kaggle"]
    for d in filter(None, dirs):
        path = Path(d).expanduser() / "kaggle.json"
        if path.is_file():
            try:
                creds = json.loads(path.read_text())
                return creds["username"], creds["key"]
            except (ValueError, KeyError) as err:
                raise DownloadError(str(path), f"expected JSON with 'username' and 'key': {err}") from err
    raise DownloadError(
        "Kaggle credentials",
        "none found: set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json (Kaggle > Settings > API >"
        " Create New Token) in ~/.kaggle/ (or $KAGGLE_CONFIG_DIR)",
    )


def kaggle_rules_hint(competition: str) -> str:
    return (
        f"Kaggle refuses competition data until you accept the rules of {competition!r} with this"
        f" account: open https://www.kaggle.com/competitions/{competition}/rules, click"
        " 'I Understand and Accept', then rerun (401 = the username/key are wrong)"
    )


def kaggle_url(competition: str, file_path: str, api: str = KAGGLE_API) -> str:
    """Kaggle's documented REST call competitionsDataDownloadFile (it redirects to the storage URL)."""
    return f"{api.rstrip('/')}/competitions/data/download/{competition}/{file_path}"


# ------------------------------------------------------------------------------------ the loop


def fetcher_for(source: str, what: str, endpoints: Endpoints | None = None, session=None, s3=None) -> Fetcher:
    if "EXAMPLE" in source:
        raise DownloadError(
            what,
            f"{source} is a row of a shipped example sheet, not a real file; build the"
            " dataset's sheet with `slidetrain sheet DATASET` (see the README)",
        )
    endpoints = endpoints or Endpoints.from_env()
    if source.startswith("gdc:"):
        url = f"{endpoints.gdc_api.rstrip('/')}/data/{source[4:]}"
        return http_fetcher(url, what, session=session)
    if source.startswith("s3://"):
        return s3_fetcher(source, what, s3 or s3_client(endpoints.s3_endpoint))
    if source.startswith("kaggle:"):
        competition, _, file_path = source[7:].partition("/")
        url = kaggle_url(competition, file_path, endpoints.kaggle_api)
        return http_fetcher(
            url, what, session=session, auth=kaggle_credentials(), hint_403=kaggle_rules_hint(competition)
        )
    if source.startswith(("http://", "https://")):
        return http_fetcher(source, what, session=session)
    raise DownloadError(what, f"source {source!r} is not downloadable; expected gdc:ID, s3://, kaggle:, http(s)://")


def is_remote(source: str) -> bool:
    return source.startswith(("gdc:", "s3://", "kaggle:", "http://", "https://"))


def partial_path(dest: Path) -> Path:
    """The stable name a download grows under (stable, so a rerun finds and resumes it)."""
    return dest.with_name(f".{dest.name}.part")


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _mismatch(path: Path, md5: str | None, size: int | None) -> str | None:
    """Why a complete file is not the expected one, or None."""
    n = path.stat().st_size
    if size is not None and n != size:
        return f"{n} bytes, expected {size}"
    if md5:
        got = file_md5(path)
        if got != md5.lower():
            return f"md5 {got}, expected {md5.lower()}"
    return None


def _append_reply(reply: Reply, part: Path, offset: int, total: int | None, slide_id: str, progress: bool) -> None:
    """Write the reply's bytes to the partial file (after its first `offset` bytes), with a progress
    bar; closes the reply. A dropped connection raises Transient (the bytes written so far stay)."""
    from tqdm import tqdm

    try:
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=slide_id,
                disable=not progress,
                mininterval=2.0,
                file=sys.stderr,
            ) as bar,
        ):
            for chunk in reply.chunks:
                f.write(chunk)
                bar.update(len(chunk))
    finally:
        reply.close()


def download(
    source: str | Fetcher,
    dest: str | os.PathLike,
    *,
    slide_id: str,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff_s: float = 2.0,
    progress: bool = True,
    endpoints: Endpoints | None = None,
) -> Path:
    """Fetch `source` to `dest`, resuming a partial file, verifying size and md5; returns `dest`.

    `retries` bounds the failed attempts (dropped connection, 5xx, mismatch) after the first; the
    wait before retry i is backoff_s * 2**(i-1). Raises DownloadError naming the slide when the
    attempts run out or the server refuses for good (4xx).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    fetch = fetcher_for(source, slide_id, endpoints) if isinstance(source, str) else source
    where = source if isinstance(source, str) else "source"
    failures = 0

    def fail(reason: str) -> None:
        nonlocal failures
        failures += 1
        if failures > retries:
            raise DownloadError(slide_id, f"download from {where} failed after {retries} retries: {reason}")
        wait = backoff_s * 2 ** (failures - 1)
        log.warning("%s: %s; retry %d/%d in %.1f s", slide_id, reason, failures, retries, wait)
        time.sleep(wait)

    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:
            log.warning("%s: partial file has %d bytes, more than the expected %d; restarting", slide_id, offset, size)
            part.unlink()
            offset = 0
        if size is None or offset < size or offset == 0:
            try:
                reply = fetch(offset)
            except RangeRejected as err:
                log.warning("%s: %s; restarting from zero", slide_id, err)
                part.unlink(missing_ok=True)
                fail(str(err))
                continue
            except Transient as err:
                fail(str(err))
                continue
            if reply.start != offset:
                # The server ignored Range (200) or answered another range: the partial file is useless.
                if offset:
                    log.warning(
                        "%s: asked for bytes %d-, got bytes from %d (no 206); restarting from zero",
                        slide_id,
                        offset,
                        reply.start,
                    )
                if reply.start != 0:
                    reply.close()
                    part.unlink(missing_ok=True)
                    fail(f"answer starts at byte {reply.start}, expected {offset}")
                    continue
                offset = 0
            total = reply.total if reply.total is not None else size
            try:
                _append_reply(reply, part, offset, total, slide_id, progress)
            except Transient as err:
                fail(str(err))
                continue
            got = part.stat().st_size
            if total is not None and got < total:
                fail(f"connection closed at byte {got} of {total}")
                continue
        why = _mismatch(part, md5, size)
        if why is None:
            os.replace(part, dest)
            log.info("%s: %d bytes verified%s", slide_id, dest.stat().st_size, " (md5)" if md5 else "")
            return dest
        part.unlink()  # complete but wrong: start again from zero
        fail(f"downloaded file does not match the sheet ({why})")


def write_exclusion_marker(dest: str | os.PathLike, slide_id: str, reason: str) -> None:
    """With on_bad_slide: exclude, a failed download leaves this marker (not slide bytes) under the
    final name, so the workflow can go on; preprocessing recognises it and excludes the slide with
    this reason in the QC table. Delete the marker to try the download again."""
    from slidetrain.io import atomic_path

    with atomic_path(dest) as tmp:
        tmp.write_bytes(EXCLUDED_MARKER + f"{slide_id}: {reason}\n".encode())


def exclusion_reason(path: str | os.PathLike) -> str | None:
    """The reason recorded by write_exclusion_marker, or None for any other file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(EXCLUDED_MARKER) + 4096)
    except OSError:
        return None
    if not head.startswith(EXCLUDED_MARKER):
        return None
    return head[len(EXCLUDED_MARKER) :].decode(errors="replace").strip()


SLIDE_EXTENSIONS = ("svs", "tif", "tiff", "ndpi", "mrxs", "scn", "bif", "vms")


def remote_ext(source: str) -> str:
    """The file extension a downloaded slide gets: GDC serves diagnostic slides as SVS; otherwise the
    source path's own extension (CAMELYON .tif, PANDA .tiff)."""
    if source.startswith("gdc:"):
        return "svs"
    ext = source.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    if ext not in SLIDE_EXTENSIONS:
        raise DownloadError(source, f"extension {ext!r} is not a slide format; expected one of {SLIDE_EXTENSIONS}")
    return ext
