"""What rules hand to `slidetrain`: command-line arguments and JSON parameters, per dataset, slide or method."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from slidetrain.errors import ConfigError
from slidetrain.workflow.plan import Plan


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
    """Training jobs depend on the dataset's feature index, one file, not one per slide (DAG size)."""
    return f"results/{plan.base_dataset(dataset)}/features/{plan.config['features']['encoder']}/index.csv"


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
