"""What rules hand to `slidetrain`: command-line arguments and JSON parameters, per dataset, slide or method."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan
from slidetrain.workflow.shard_jobs import manifests


def method_params(plan: Plan, method: str) -> str:
    """The method's config block as JSON (its dataclass validates the keys in the job)."""
    if method not in plan.config["methods"]:
        raise ConfigError(f"method {method!r} has no block under `methods` in the config; known: {plan.all_methods}")
    return json.dumps(plan.config["methods"][method])


#: `weights:` values that name no file (random init, torchvision's download)
NO_WEIGHTS_FILE = (None, "none", "imagenet")


def weights_files(params: Mapping[str, Any] | str) -> list[str]:
    """The local weights file a job reads (`weights:` in its params, a dict or its JSON), as an input.

    So Snakemake builds it first when a rule makes it (results/pretrain/{arch}/encoder.pt), reruns the
    job when it changes, and stops with the missing path named when nothing makes it."""
    if isinstance(params, str):
        params = json.loads(params)
    weights = params.get("weights")
    return [] if weights in NO_WEIGHTS_FILE else [str(weights)]


def feature_index(plan: Plan, dataset: str) -> str:
    """Training jobs depend on the dataset's feature index, one file, not one per slide (DAG size): the
    extracted features' (features/{encoder}/), or the checked index of a features_dir other tools wrote
    (external_features/, built without tiling or extraction)."""
    base = plan.base_dataset(dataset)
    if not plan.extracts_features(base):
        return f"results/{base}/external_features/index.csv"
    return f"results/{base}/features/{plan.config['features']['encoder']}/index.csv"


def features_dir(plan: Plan, dataset: str) -> str:
    """The folder the MIL jobs read the per-slide feature files from (`--features`)."""
    base = plan.base_dataset(dataset)
    return plan.features_dir(base) or f"results/{base}/features/{plan.config['features']['encoder']}"


def external_features_dir(plan: Plan, dataset: str) -> str:
    """datasets.X.features_dir of a dataset whose features another tool wrote; an error for any other."""
    folder = plan.features_dir(dataset)
    if folder is None:
        raise ConfigError(f"datasets.{dataset}.features_dir is not set: the pipeline extracts this dataset's features")
    return folder


def preprocessed_for_slides(plan: Plan, dataset: str) -> list[str]:
    """Extra inputs of the jobs that read a dataset's tiles or images (whole-image, tile-bag): its preprocess
    manifests when its QC status comes from a features_dir index (which implies no preprocessing); none
    otherwise, since the status table already waits for preprocessing."""
    base = plan.base_dataset(dataset)
    return [] if plan.extracts_features(base) else manifests(plan, base, "preprocess")


def qc_status_source(plan: Plan, dataset: str) -> tuple[str, list[str]]:
    """(qc-status option, its inputs) of results/{dataset}/qc/status.csv: the preprocess shard manifests, or
    for a features_dir dataset the checked feature index (every slide has a non-empty file: none excluded)."""
    if not plan.extracts_features(dataset):
        return "--feature-index", [feature_index(plan, dataset)]
    return "--manifests", manifests(plan, dataset, "preprocess")


def preprocess_args(preprocess: Mapping[str, Any], dataset_block: Mapping[str, Any], on_bad_slide: str) -> str:
    """`--params JSON --on-bad-slide X` of the preprocessing of one dataset (`preprocess` block)."""
    params = {
        "mask_preset": preprocess["mask_preset"],
        "mask_overrides": preprocess.get("mask_overrides", {}),
        "target_magnification": preprocess["target_magnification"],
        "tile_px": preprocess["tile_px"],
        "overlap_px": preprocess["overlap_px"],
        "min_tissue_fraction": preprocess["min_tissue_fraction"],
        "image_magnification": preprocess["image_magnification"],
        "mpp_fallback": dataset_block.get("mpp_fallback"),
    }
    for key in ("tile_foreground", "foreground_grey_range"):  # only when set: the default's jobs stay as they are
        if key in preprocess:
            params[key] = preprocess[key]
    return f"--params '{json.dumps(params)}' --on-bad-slide {on_bad_slide}"


def preprocess_args_by_dataset(plan: Plan) -> dict[str, str]:
    """preprocess_args of every dataset with a sheet, computed once: Snakemake calls a rule's params
    functions per job, which dominates planning at 10,000+ slides."""
    p = plan.config["preprocess"]
    return {d: preprocess_args(p, plan.dataset_cfg(d), p["on_bad_slide"]) for d in plan.sheets}


def mpp_arg(plan: Plan, dataset: str) -> str:
    """`--mpp-fallback X` when the dataset sets one (slides without MPP metadata), else nothing."""
    mpp = plan.dataset_cfg(dataset).get("mpp_fallback")
    return f"--mpp-fallback {mpp}" if mpp else ""


def download_args(plan: Plan, dataset: str, slide: str) -> str:
    """`slidetrain download-slide` arguments: the sheet's source (md5 and size when given), the
    `download` block's retries, backoff and endpoints."""
    row = plan.sheets[dataset].loc[slide]
    dl = plan.config.get("download", {})
    args = [
        f"--source {row.source!r}",
        f"--retries {dl.get('retries', 5)}",
        f"--backoff-s {dl.get('backoff_s', 2.0)}",
        f"--on-bad-slide {plan.config['preprocess']['on_bad_slide']}",
    ]
    if row.get("md5", ""):
        args.append(f"--md5 {row.md5}")
    if row.get("size", ""):
        args.append(f"--size {row['size']}")
    for key in ("gdc_api", "kaggle_api", "s3_endpoint"):
        if dl.get(key):
            args.append(f"--{key.replace('_', '-')} {dl[key]!r}")
    return " ".join(args)


def paper_split_args(plan: Plan, dataset: str, split: str) -> str:
    """`slidetrain make-split` arguments of a dataset's own split settings (paper counts, fixed test)."""
    own = plan.dataset_split(dataset)
    if split == "official":
        return "--official-subset" if own.get("official_subset") else ""
    args = []
    if own.get("counts"):
        args.append("--counts " + " ".join(map(str, own["counts"])))
        if own.get("fixed_test"):
            args.append("--fixed-test")
    return " ".join(args)


def image_device(plan: Plan) -> str:
    """Device of the whole-image learners (training.device)."""
    return plan.config.get("training", {}).get("device", "cpu")


def inference_slides(plan: Plan) -> dict[str, tuple[int, int]]:
    """The inference benchmark's slide sizes by name: {"WxH": (W, H)} (bench.inference.slide_px)."""
    sizes = plan.config.get("bench", {}).get("inference", {}).get("slide_px", [])
    return {f"{w}x{h}": (w, h) for w, h in sizes}
