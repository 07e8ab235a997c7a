"""`slidetrain download` and `slidetrain sheet <dataset>`: the real-data subcommands (cli.py adds them)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def cmd_download(a: argparse.Namespace) -> None:
    from slidetrain.data.download import Endpoints, download, write_exclusion_marker
    from slidetrain.errors import DownloadError

    endpoints = Endpoints.from_env(gdc_api=a.gdc_api, kaggle_api=a.kaggle_api, s3_endpoint=a.s3_endpoint)
    try:
        download(
            a.source, a.out, slide_id=a.slide_id, md5=a.md5 or None, size=a.size, retries=a.retries,
            backoff_s=a.backoff_s, progress=not a.no_progress, endpoints=endpoints,
        )
    except DownloadError as err:
        if a.on_bad_slide != "exclude":
            raise
        log.warning("excluding %s: %s", a.slide_id, err)
        write_exclusion_marker(a.out, a.slide_id, str(err))


def add_parsers(sub) -> None:
    s = sub.add_parser("download", help="fetch one slide (resumable, md5-verified) from gdc:, s3://, kaggle: or http(s)")
    s.add_argument("--source", required=True, help="the sheet's source: gdc:ID, s3://BUCKET/KEY, kaggle:COMP/PATH, URL")
    s.add_argument("--out", required=True)
    s.add_argument("--slide-id", required=True)
    s.add_argument("--md5", default="", help="expected md5 (hex); empty = size check only")
    s.add_argument("--size", type=int, default=None, help="expected size in bytes")
    s.add_argument("--retries", type=int, default=5)
    s.add_argument("--backoff-s", type=float, default=2.0, help="wait before retry i: BACKOFF * 2**(i-1)")
    s.add_argument("--on-bad-slide", choices=["error", "exclude"], default="error",
                   help="exclude: a slide that cannot be fetched or verified is left out (QC table), not an error")
    s.add_argument("--gdc-api", help="GDC API base (default https://api.gdc.cancer.gov or $SLIDETRAIN_GDC_API)")
    s.add_argument("--kaggle-api", help="Kaggle API base (default https://www.kaggle.com/api/v1)")
    s.add_argument("--s3-endpoint", help="S3 endpoint URL (default AWS)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_download)
