"""`slidetrain` subcommands of slidetrain.wsi: slides: synthesis, preprocessing (mask, tiles, image), features, QC.

slidetrain.cli calls `add_parsers`; imports stay inside the commands so that
`slidetrain --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slidetrain.cli_args import json_arg
from slidetrain.wsi import heatmap_commands


def cmd_synthesize(a: argparse.Namespace) -> None:
    from slidetrain.wsi.synthetic import resolve_difficulty, synthetic_spec, write_synthetic_slide

    difficulty = resolve_difficulty(a.difficulty, a.difficulty_overrides)
    spec = synthetic_spec(a.slide_id, a.label, a.seed, tuple(a.size_range_px), difficulty=difficulty)
    if a.size_px:  # an exact size, e.g. the 40,960 x 30,720 benchmark slide
        import dataclasses

        spec = dataclasses.replace(spec, width_px=a.size_px[0], height_px=a.size_px[1])
    write_synthetic_slide(a.out, spec, truth_path=a.truth)


def cmd_preprocess(a: argparse.Namespace) -> None:
    from slidetrain.wsi.exclusion import preprocess_or_exclude

    outputs = {
        "mask_png": a.mask,
        "qc_path": a.qc,
        "tiles_h5": a.tiles,
        "image_path": a.image,
        "image_meta_json": a.image_meta,
        "timings_json": a.timings,
    }
    preprocess_or_exclude(
        a.slide, a.slide_id, outputs=outputs, params=a.params, on_bad_slide=a.on_bad_slide, status_json=a.status
    )


def cmd_features(a: argparse.Namespace) -> None:
    from slidetrain.wsi.features import FeatureJob, extract_features

    jobs = []
    for item in a.slides:
        slide_id, _, path = item.partition("=")
        jobs.append(
            FeatureJob(slide_id, Path(path), Path(a.tiles_dir) / f"{slide_id}.h5", Path(a.out_dir) / f"{slide_id}.h5")
        )
    extract_features(
        jobs,
        a.encoder,
        a.weights,
        batch_size=a.batch_size,
        device=a.device,
        threads=a.threads,
        seed=a.seed,
        mpp_fallback=a.mpp_fallback,
        workers=a.workers,
        amp=a.amp,
        shard=a.shard,
        manifest=a.manifest,
        sha256=a.weights_sha256 or None,
    )


def cmd_synthesize_shard(a: argparse.Namespace) -> None:
    from slidetrain.wsi.shard import parse_pairs, synthesize_shard

    synthesize_shard(
        a.shard,
        parse_pairs(a.slides, "label"),
        a.out_dir,
        a.seed,
        tuple(a.size_range_px),
        manifest=a.manifest,
        stain_scale=tuple(a.stain_scale),
        difficulty=a.difficulty,
        difficulty_overrides=a.difficulty_overrides,
    )


def cmd_preprocess_shard(a: argparse.Namespace) -> None:
    from slidetrain.wsi.shard import parse_pairs, preprocess_shard

    preprocess_shard(a.shard, parse_pairs(a.slides, "path"), a.out_root, a.params, a.on_bad_slide, manifest=a.manifest)


def cmd_qc_status(a: argparse.Namespace) -> None:
    from slidetrain.wsi import exclusion

    if a.feature_index:
        exclusion.write_status_table_from_feature_index(a.feature_index, a.out)
    elif a.manifests:
        exclusion.write_status_table_from_manifests(a.manifests, a.out)
    else:
        exclusion.write_status_table(a.status, a.out)


def cmd_external_feature_index(a: argparse.Namespace) -> None:
    from slidetrain.data.sheet import read_sheet
    from slidetrain.wsi.external_features import external_feature_index

    slide_ids = read_sheet(a.sheet, a.classes, check_files=False).slide_id.tolist()  # the features stand in
    external_feature_index(a.features_dir, slide_ids, a.out, dim=a.dim)


def cmd_feature_index(a: argparse.Namespace) -> None:
    from slidetrain.wsi.features import write_feature_index

    files = list(a.features)
    if a.manifests:  # one argument per shard: the manifests list every slide's feature file
        from slidetrain.data.shards import manifest_column

        files += manifest_column(a.manifests, "features")
    write_feature_index(files, a.out)


def cmd_qc_table(a: argparse.Namespace) -> None:
    from slidetrain.wsi.exclusion import write_exclusion_table

    write_exclusion_table(a.status, a.out)


def cmd_qc_pictures(a: argparse.Namespace) -> None:
    from slidetrain.report_html import write_excluded_pictures

    write_excluded_pictures(a.status, a.pictures_dir, a.out, a.dataset)


def _add_synthesize_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synthesize", help="draw one synthetic slide (pyramidal TIFF + truth masks)")
    s.add_argument("--slide-id", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range-px", type=int, nargs=2, default=(3000, 6000))
    s.add_argument("--size-px", type=int, nargs=2, help="exact level-0 width and height (overrides the range)")
    s.add_argument("--out", required=True)
    s.add_argument("--truth")
    _add_difficulty_arguments(s)
    s.set_defaults(func=cmd_synthesize)


def _add_difficulty_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--difficulty", default="classic", help="difficulty preset (slidetrain.wsi.synthetic.DIFFICULTY_PRESETS)"
    )
    s.add_argument(
        "--difficulty-overrides", type=json_arg, default={}, help="JSON: per-key overrides of the preset's Difficulty"
    )


def _add_preprocess_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("preprocess", help="mask tissue, tile, write QC picture and the whole-slide image")
    s.add_argument("--slide", required=True)
    s.add_argument("--slide-id", required=True)
    s.add_argument("--mask", required=True, help="tissue mask PNG (0/255 at the segmentation level)")
    s.add_argument("--qc", required=True, help="QC picture (thumbnail, mask outline, kept tiles)")
    s.add_argument("--tiles", required=True, help="tile coordinates h5 (CLAM/TRIDENT layout)")
    s.add_argument("--image", required=True, help="whole-slide image JPEG at the image magnification")
    s.add_argument("--image-meta", required=True, help="its JSON (level-0 box, downsample)")
    s.add_argument("--timings", required=True, help="per-stage seconds JSON")
    s.add_argument("--params", type=json_arg, default={}, help="JSON: preprocess parameters")
    s.add_argument("--on-bad-slide", choices=["error", "exclude"], default="error")
    s.add_argument("--status", required=True, help="status JSON (ok or excluded with the reason)")
    s.set_defaults(func=cmd_preprocess)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("features", help="extract frozen tile features for slides (encoder loaded once)")
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=path pairs")
    s.add_argument("--tiles-dir", required=True)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--encoder", required=True)
    s.add_argument("--weights", default="none")
    s.add_argument("--weights-sha256", default="", help="expected sha256 of the weights file (foundation models)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp-fallback", type=float)
    s.add_argument("--workers", type=int, default=0, help="reader processes ahead of the encoder (0: none)")
    s.add_argument("--amp", action="store_true", help="CUDA: float16 autocast")
    s.add_argument("--shard", default="-", help="shard name, for progress and errors")
    s.add_argument("--manifest", help="write the shard manifest (slide_id, status, reason, features)")
    s.set_defaults(func=cmd_features)


def _add_synthesize_shard_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synthesize-shard", help="draw a shard of synthetic slides (skips finished ones)")
    s.add_argument("--shard", required=True)
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=label pairs")
    s.add_argument("--out-dir", required=True, help="resources/{dataset}/slides")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range-px", type=int, nargs=2, default=(3000, 6000))
    s.add_argument(
        "--stain-scale",
        type=float,
        nargs=2,
        default=(1.0, 1.0),
        help="hematoxylin, eosin factors on every slide's stain (an external cohort's shift)",
    )
    _add_difficulty_arguments(s)
    s.add_argument("--manifest", required=True)
    s.set_defaults(func=cmd_synthesize_shard)


def _add_preprocess_shard_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("preprocess-shard", help="preprocess a shard of slides (skips finished ones)")
    s.add_argument("--shard", required=True)
    s.add_argument("--slides", nargs="+", required=True, help="slide_id=path pairs")
    s.add_argument("--out-root", required=True, help="results/{dataset}: masks/, tiles/, images/, ... go below")
    s.add_argument("--params", type=json_arg, default={}, help="JSON: preprocess parameters")
    s.add_argument("--on-bad-slide", choices=["error", "exclude"], default="error")
    s.add_argument("--manifest", required=True)
    s.set_defaults(func=cmd_preprocess_shard)


def _add_qc_status_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("qc-status", help="one dataset's per-slide QC statuses as one table")
    s.add_argument("--status", nargs="*", default=[], help="per-slide status JSONs")
    s.add_argument("--manifests", nargs="*", default=[], help="or: the dataset's preprocess shard manifests")
    s.add_argument("--feature-index", help="or: the checked index of a features_dir (every slide ok)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_qc_status)


def _add_external_feature_index_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "external-feature-index",
        help="check a folder of per-slide features other tools wrote (TRIDENT, CLAM) against a sheet; write its index",
    )
    s.add_argument("--features-dir", required=True, help="datasets.X.features_dir")
    s.add_argument("--sheet", required=True, help="the dataset's slide sheet: every slide needs a file")
    s.add_argument("--classes", nargs="+", required=True)
    s.add_argument("--dim", type=int, help="expected feature dimension (default: the one most slides have)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_external_feature_index)


def _add_feature_index_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("feature-index", help="index of a dataset's feature files (checks each is complete)")
    s.add_argument("--features", nargs="*", default=[])
    s.add_argument("--manifests", nargs="*", default=[], help="features shard manifests (their features column)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_feature_index)


def _add_qc_table_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("qc-table", help="collect excluded slides and their reasons over datasets")
    s.add_argument("--status", nargs="+", required=True, help="per-dataset status tables")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_qc_table)


def _add_qc_pictures_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("qc-pictures", help="one HTML page of the QC pictures of a dataset's excluded slides")
    s.add_argument("--status", required=True, help="results/{dataset}/qc/status.csv")
    s.add_argument("--pictures-dir", required=True, help="folder of the {slide}.qc.jpg pictures")
    s.add_argument("--dataset", required=True)
    s.add_argument("--out", required=True, help="HTML")
    s.set_defaults(func=cmd_qc_pictures)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_synthesize_parser(sub)
    _add_preprocess_parser(sub)
    _add_features_parser(sub)
    _add_synthesize_shard_parser(sub)
    _add_preprocess_shard_parser(sub)
    _add_qc_status_parser(sub)
    _add_feature_index_parser(sub)
    _add_external_feature_index_parser(sub)
    _add_qc_table_parser(sub)
    _add_qc_pictures_parser(sub)
    heatmap_commands.add_parsers(sub)  # heatmaps keep their parsers in their own module
