# Sheets, wildcard constraints and input functions. Every sheet is read (and validated) at parse time,
# so every per-slide step is an ordinary wildcard rule and the DAG needs no checkpoints.
import json

from slidetrain.data.download import SLIDE_EXTENSIONS, is_remote, remote_ext
from slidetrain.data.sheet import SYNTHETIC, local_path, read_sheet, validate_sheet
from slidetrain.errors import SlidetrainError
from snakemake.utils import validate as validate_rows
from pathlib import Path


def _load_sheets():
    sheets = {}
    for name, ds in config["datasets"].items():
        try:
            sheet = read_sheet(ds["sheet"], ds["classes"])
        except SlidetrainError as err:
            raise WorkflowError(f"datasets.{name}.sheet: {err}")
        validate_rows(sheet, "../schemas/sheet.schema.yaml")
        sheets[name] = sheet.set_index("slide_id", drop=False)
    return sheets


SHEETS = _load_sheets()
SPLITS = [f"mccv{i}" for i in range(config["splits"]["mccv_folds"])]
OFFICIAL = config["splits"].get("official", {})
SEEDS = [str(s) for s in config["seeds"]]

def _whole_image_methods():
    from slidetrain.train.local import whole_image_methods

    return set(whole_image_methods())


# Two trainers share the run layout: MIL aggregators on cached features, whole-image learners on the
# 5x (or configured) slide images. Each rule accepts only its own methods (wildcard constraints).
IMAGE_METHODS = sorted(m for m in config["methods"] if m in _whole_image_methods())
MIL_METHODS = sorted(m for m in config["methods"] if m not in IMAGE_METHODS)
ALL_METHODS = sorted(config["methods"])


def _method_regex(methods):
    # A never-matching pattern when a config has no method of this kind (an empty alternation matches "").
    return "|".join(methods) if methods else "(?!x)x"


def _check_methods():
    """Every method a table asks for has a config block that its dataclass accepts (fail before any job runs)."""
    from slidetrain.models import method_config
    from slidetrain.train.local import learner_config

    for table in ("table1", "table4"):
        for method in config.get(table, {}).get("methods", []):
            if method not in config["methods"]:
                raise WorkflowError(
                    f"{table}.methods names {method!r}, which has no block under `methods`; known: {ALL_METHODS}"
                )
    for method, params in config["methods"].items():
        try:
            (learner_config if method in IMAGE_METHODS else method_config)(method, params)
        except SlidetrainError as err:
            raise WorkflowError(f"config: {err}")


_check_methods()


wildcard_constraints:
    dataset="|".join(SHEETS),
    slide=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    split=r"mccv\d+|official",
    seed=r"\d+",
    method=r"[a-z0-9_]+",
    encoder=r"[a-z0-9_]+",


def dataset_cfg(dataset):
    return config["datasets"][dataset]


def slide_ids(dataset):
    return SHEETS[dataset].slide_id.tolist()


def slide_file(dataset, slide):
    """Where a slide lives: drawn by the pipeline (synthetic) or the sheet's path."""
    try:
        source = SHEETS[dataset].at[slide, "source"]
    except KeyError:
        raise WorkflowError(f"slide {slide!r} is not in the sheet of dataset {dataset!r}")
    if source == SYNTHETIC:
        return f"resources/{dataset}/slides/{slide}.tiff"
    if is_remote(source):  # fetched by rule download_slide (workflow/rules/download.smk)
        return f"resources/{dataset}/slides/{slide}.{remote_ext(source)}"
    return str(local_path(source, Path(dataset_cfg(dataset)["sheet"]).parent))


def slide_input(wildcards):
    return slide_file(wildcards.dataset, wildcards.slide)


def statuses(dataset):
    return expand("results/{dataset}/qc/status/{slide}.json", dataset=dataset, slide=slide_ids(dataset))


def features_of(dataset):
    enc = config["features"]["encoder"]
    return expand("results/{dataset}/features/{enc}/{slide}.h5", dataset=dataset, enc=enc, slide=slide_ids(dataset))


def feature_index(wildcards):
    """Training jobs depend on the dataset's feature index, one file, not one per slide (DAG size)."""
    return f"results/{wildcards.dataset}/features/{config['features']['encoder']}/index.csv"


def method_params(method):
    if method not in config["methods"]:
        raise WorkflowError(f"method {method!r} has no block under `methods` in the config; known: {ALL_METHODS}")
    return json.dumps(config["methods"][method])


def runs_of(dataset, method):
    splits = SPLITS + (["official"] if dataset in OFFICIAL else [])
    if dataset_cfg(dataset).get("split", {}).get("mccv") is False:  # the official split only (CAMELYON)
        splits = ["official"]
    if method in IMAGE_METHODS and config.get("training", {}).get("whole_image_splits"):
        splits = splits[: config["training"]["whole_image_splits"]]
    return expand(
        "results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
        dataset=dataset, method=method, split=splits, seed=SEEDS,
    )

def _preprocess_args(dataset_block, on_bad_slide):
    p = config["preprocess"]
    params = {
        "mask_preset": p["mask_preset"],
        "mask_overrides": p.get("mask_overrides", {}),
        "target_magnification": p["target_magnification"],
        "tile_px": p["tile_px"],
        "overlap_px": p["overlap_px"],
        "min_tissue_fraction": p["min_tissue_fraction"],
        "image_magnification": p["image_magnification"],
        "mpp_fallback": dataset_block.get("mpp_fallback"),
    }
    return f"--params '{json.dumps(params)}' --on-bad-slide {on_bad_slide}"


# Per-slide rules take one params function each: Snakemake inspects every function per job,
# which dominates planning at 10,000+ slides. The strings are computed once per dataset.
_PREPROCESS_ARGS = {d: _preprocess_args(dataset_cfg(d), config["preprocess"]["on_bad_slide"]) for d in SHEETS}


def preprocess_args(wildcards, dataset_block=None, on_bad_slide=None):
    if dataset_block is not None:
        return _preprocess_args(dataset_block, on_bad_slide)
    return _PREPROCESS_ARGS[wildcards.dataset]


def synthesize_args(wildcards):
    ds = dataset_cfg(wildcards.dataset)
    size = " ".join(map(str, ds["synthetic_size_range_px"]))
    label = SHEETS[wildcards.dataset].at[wildcards.slide, "label"]
    return f"--label {label} --seed {ds['synthetic_seed']} --size-range-px {size}"


def mpp_arg(wildcards):
    mpp = dataset_cfg(wildcards.dataset).get("mpp_fallback")
    return f"--mpp-fallback {mpp}" if mpp else ""


def table1_metrics(wildcards):
    files = []
    for dataset in config["table1"]["datasets"]:
        for method in config["table1"]["methods"]:
            if not table1_applicable(method, dataset):
                continue
            files += runs_of(dataset, method)
    return files


def table1_applicable(method, dataset):
    """Binary-only methods (MIL-RNN) get a '/' row on multi-class datasets, as the paper shows."""
    from slidetrain.models import REGISTRY

    if method in IMAGE_METHODS:
        return True
    return not (REGISTRY[method].binary_only and len(dataset_cfg(dataset)["classes"]) != 2)


def attention_methods(dataset):
    """Table 1 methods that export per-tile attention and ran on `dataset`."""
    from slidetrain.models import REGISTRY

    return [
        m
        for m in config["table1"]["methods"]
        if m in MIL_METHODS and REGISTRY[m].model_cls.has_attention and table1_applicable(m, dataset)
    ]


def is_synthetic(dataset):
    return bool((SHEETS[dataset].source == SYNTHETIC).all())


def table4_metrics(wildcards):
    return [f for d in config["table4"]["datasets"] for m in config["table4"]["methods"] for f in runs_of(d, m)]


def images_dir(dataset):
    return f"results/{dataset}/images"


def _image_device():
    return config.get("training", {}).get("device", "cpu")


def _bench_cfg(key, default=None):
    return config.get("bench", {}).get(key, default)


_INFERENCE_SLIDES = {f"{w}x{h}": (w, h) for w, h in _bench_cfg("inference", {}).get("slide_px", [])}


# Real data (workflow/rules/download.smk, splits.smk): remote slides and per-dataset split settings.
def _remote_datasets():
    return sorted(d for d, sheet in SHEETS.items() if sheet.source.map(is_remote).any())


REMOTE_DATASETS = _remote_datasets()


def download_args(wildcards):
    row = SHEETS[wildcards.dataset].loc[wildcards.slide]
    dl = config.get("download", {})
    args = [f"--source {row.source!r}", f"--retries {dl.get('retries', 5)}", f"--backoff-s {dl.get('backoff_s', 2.0)}",
            f"--on-bad-slide {config['preprocess']['on_bad_slide']}"]
    if row.get("md5", ""):
        args.append(f"--md5 {row.md5}")
    if row.get("size", ""):
        args.append(f"--size {row['size']}")
    for key in ("gdc_api", "kaggle_api", "s3_endpoint"):
        if dl.get(key):
            args.append(f"--{key.replace('_', '-')} {dl[key]!r}")
    return " ".join(args)


def dataset_split(dataset):
    """A dataset's own split settings (datasets.X.split), over the global `splits`."""
    return dataset_cfg(dataset).get("split", {})


def paper_split_args(dataset, split):
    own = dataset_split(dataset)
    if split == "official":
        return "--official-subset" if own.get("official_subset") else ""
    args = []
    if own.get("counts"):
        args.append("--counts " + " ".join(map(str, own["counts"])))
        if own.get("fixed_test"):
            args.append("--fixed-test")
    return " ".join(args)
