"""`slidetrain` subcommands of slidetrain.data: sheets (synthetic and real), splits, downloads (cli.py adds them)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from slidetrain.cli_args import json_arg

log = logging.getLogger(__name__)


def cmd_download(a: argparse.Namespace) -> None:
    from slidetrain.data.download import Endpoints, download, write_exclusion_marker
    from slidetrain.errors import DownloadError

    endpoints = Endpoints.from_env(gdc_api=a.gdc_api, kaggle_api=a.kaggle_api, s3_endpoint=a.s3_endpoint)
    try:
        download(
            a.source,
            a.out,
            slide_id=a.slide_id,
            md5=a.md5 or None,
            size=a.size,
            retries=a.retries,
            backoff_s=a.backoff_s,
            progress=not a.no_progress,
            endpoints=endpoints,
        )
    except DownloadError as err:
        if a.on_bad_slide != "exclude":
            raise
        log.warning("excluding %s: %s", a.slide_id, err)
        write_exclusion_marker(a.out, a.slide_id, str(err))


def cmd_sheet(a: argparse.Namespace) -> None:
    """Build config/sheets/<dataset>.tsv from the dataset's source (needs internet)."""

    from slidetrain.data.download import Endpoints, s3_client
    from slidetrain.data.sheet import validate_sheet
    from slidetrain.io import atomic_path

    endpoints = Endpoints.from_env(gdc_api=a.gdc_api, kaggle_api=a.kaggle_api, s3_endpoint=a.s3_endpoint)
    left_out = None
    if a.dataset.startswith("tcga_"):
        from slidetrain.data.sources.gdc import gdc_sheet

        sheet, left_out = gdc_sheet(a.dataset, api=endpoints.gdc_api)
    elif a.dataset in ("camelyon16", "camelyon17"):
        from slidetrain.data.sources import camelyon

        client = s3_client(endpoints.s3_endpoint)
        if a.dataset == "camelyon16":
            sheet, left_out = camelyon.camelyon16_sheet(client, bucket=a.bucket)
        else:
            sheet, left_out = camelyon.camelyon17_sheet(client, bucket=a.bucket, itc_label=a.itc_label)
    elif a.dataset == "panda":
        from slidetrain.data.sources.panda import panda_sheet

        sheet = panda_sheet(api=endpoints.kaggle_api)
    else:  # argparse choices keep other names out
        raise AssertionError(a.dataset)
    classes = sorted(set(sheet.label))
    validate_sheet(sheet, classes, where=f"{a.dataset} sheet", check_files=False)
    out = Path(a.out or f"config/sheets/{a.dataset}.tsv")
    with atomic_path(out) as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    log.info("%s: %d slides, labels %s -> %s", a.dataset, len(sheet), sheet.label.value_counts().to_dict(), out)
    if left_out is not None and len(left_out):
        listed = out.with_name(f"{out.stem}.left_out.tsv")
        with atomic_path(listed) as tmp:
            left_out.to_csv(tmp, sep="\t", index=False)
        log.warning("%s: %d slide(s) left out, with reasons, in %s", a.dataset, len(left_out), listed)
    if a.dataset == "camelyon17":  # the official split, with the seeded validation part, as a file
        from slidetrain.data.splits import official_from_sheet, write_split

        split = official_from_sheet(sheet, seed=a.seed, n_val_slides=a.n_val)
        write_split(split, out.with_name(f"{out.stem}.official.csv"))


def cmd_external_split(a: argparse.Namespace) -> None:
    from slidetrain.data.sheet import read_sheet
    from slidetrain.data.splits import external_test_split, write_external_split
    from slidetrain.wsi.exclusion import excluded_slides

    sheet = read_sheet(a.sheet, a.classes, check_files=False)
    excluded = excluded_slides(a.status) if a.status else {}  # left out after the draw: the rest stay put
    if a.label_map:  # a derived dataset's external set: the same slides under mapped labels
        from slidetrain.data.sheet import relabel

        sheet = relabel(sheet, a.label_map)
    write_external_split(external_test_split(sheet, a.seed, a.one_per_patient, excluded=excluded), a.out)


def _add_own_parsers(sub) -> None:
    from slidetrain.data.sources import DATASETS

    s = sub.add_parser("sheet", help="build a dataset's slide sheet from its source (GDC, S3, Kaggle; needs internet)")
    s.add_argument("dataset", choices=DATASETS)
    s.add_argument("--out", help="default config/sheets/DATASET.tsv")
    s.add_argument("--gdc-api")
    s.add_argument("--kaggle-api")
    s.add_argument("--s3-endpoint")
    s.add_argument("--bucket", default="camelyon-dataset")
    s.add_argument(
        "--itc-label",
        choices=["tumor", "normal"],
        default="tumor",
        help="CAMELYON17 slides with isolated tumour cells (see slidetrain.data.sources.camelyon)",
    )
    s.add_argument("--seed", type=int, default=0, help="CAMELYON17: seed of the 50 validation slides")
    s.add_argument("--n-val", type=int, default=50, help="CAMELYON17: validation slides drawn from train")
    s.set_defaults(func=cmd_sheet)

    s = sub.add_parser("external-split", help="an external test set: every slide, or one per patient, in part test")
    s.add_argument("--sheet", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--one-per-patient", action="store_true")
    s.add_argument("--status", help="the dataset's QC status table (excluded slides are left out)")
    s.add_argument("--label-map", type=json.loads, help="JSON {source class: derived class} of a derived dataset")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_external_split)

    s = sub.add_parser(
        "download", help="fetch one slide (resumable, md5-verified) from gdc:, s3://, kaggle: or http(s)"
    )
    s.add_argument("--source", required=True, help="the sheet's source: gdc:ID, s3://BUCKET/KEY, kaggle:COMP/PATH, URL")
    s.add_argument("--out", required=True)
    s.add_argument("--slide-id", required=True)
    s.add_argument("--md5", default="", help="expected md5 (hex); empty = size check only")
    s.add_argument("--size", type=int, default=None, help="expected size in bytes")
    s.add_argument("--retries", type=int, default=5)
    s.add_argument("--backoff-s", type=float, default=2.0, help="wait before retry i: BACKOFF * 2**(i-1)")
    s.add_argument(
        "--on-bad-slide",
        choices=["error", "exclude"],
        default="error",
        help="exclude: a slide that cannot be fetched or verified is left out (QC table), not an error",
    )
    s.add_argument("--gdc-api", help="GDC API base (default https://api.gdc.cancer.gov or $SLIDETRAIN_GDC_API)")
    s.add_argument("--kaggle-api", help="Kaggle API base (default https://www.kaggle.com/api/v1)")
    s.add_argument("--s3-endpoint", help="S3 endpoint URL (default AWS)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_download)


def cmd_make_sheet(a: argparse.Namespace) -> None:
    from slidetrain.io import atomic_path
    from slidetrain.wsi.synthetic import synthetic_sheet

    sheet = synthetic_sheet(a.n_slides, a.seed)
    with atomic_path(a.out) as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)


def cmd_split(a: argparse.Namespace) -> None:
    from slidetrain.data.sheet import read_sheet
    from slidetrain.data.splits import drop_excluded, make_split, read_official_split, write_split
    from slidetrain.wsi.exclusion import excluded_slides

    sheet = read_sheet(a.sheet, a.classes, check_files=False)
    # Drawn on the whole sheet, excluded slides removed afterwards: a newly excluded slide moves no other slide.
    excluded = excluded_slides(a.status) if a.status else {}
    if a.label_map:  # a derived dataset: same slides, mapped labels (stratified on the new labels)
        from slidetrain.data.sheet import relabel

        sheet = relabel(sheet, a.label_map)
    if a.official:
        split = read_official_split(a.official, sheet, allow_subset=a.official_subset)
    elif a.counts:  # e.g. the local-learning paper's slide counts (paper/data/local_splits.csv)
        from slidetrain.data.splits import make_split_counts

        test = sheet.slide_id[sheet["official_part"].str.lower() == "test"] if a.fixed_test else None
        split = make_split_counts(sheet, seed=a.seed, counts=a.counts, test_slides=test)
        logging.info("split counts %s (asked %s)", split.part.value_counts().to_dict(), a.counts)
    else:
        split = make_split(sheet, seed=a.seed, fractions=tuple(a.fractions))
    write_split(drop_excluded(split, excluded), a.out)


def _add_make_sheet_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("make-sheet", help="write the synthetic dataset's slide sheet")
    s.add_argument("--n-slides", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_make_sheet)


def _add_split_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("split", help="write a seeded, patient-grouped, stratified split (or validate an official one)")
    s.add_argument("--sheet", required=True)
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.15, 0.25))
    s.add_argument("--official")
    s.add_argument("--official-subset", action="store_true", help="the official split may leave sheet slides out")
    s.add_argument("--counts", type=int, nargs=3, help="slides per part (train val test) instead of fractions")
    s.add_argument(
        "--fixed-test",
        action="store_true",
        help="with --counts: the sheet's official_part=test slides are the test part",
    )
    s.add_argument("--status", help="the dataset's QC status table; excluded slides are left out")
    s.add_argument("--label-map", type=json_arg, help="JSON {label: new label}: a derived dataset's labels")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_split)


def _add_moved_parsers(sub: argparse._SubParsersAction) -> None:
    _add_make_sheet_parser(sub)
    _add_split_parser(sub)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_moved_parsers(sub)
    _add_own_parsers(sub)
