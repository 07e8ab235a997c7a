# Sheets, wildcard constraints and input functions. Every sheet is read (and validated) at parse time,
# so every per-slide step is an ordinary wildcard rule and the DAG needs no checkpoints.
import json

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
MIL_METHODS = sorted(config["methods"])


def _check_methods():
    """Every method a table asks for has a config block that its dataclass accepts (fail before any job runs)."""
    from slidetrain.models import method_config

    for method in config["table1"]["methods"]:
        if method not in config["methods"]:
            raise WorkflowError(f"table1.methods names {method!r}, which has no block under `methods`; known: {MIL_METHODS}")
    for method, params in config["methods"].items():
        try:
            method_config(method, params)
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
        raise WorkflowError(f"method {method!r} has no block under `methods` in the config; known: {MIL_METHODS}")
    return json.dumps(config["methods"][method])


def runs_of(dataset, method):
    splits = SPLITS + (["official"] if dataset in OFFICIAL else [])
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

    return not (REGISTRY[method].binary_only and len(dataset_cfg(dataset)["classes"]) != 2)


def attention_methods(dataset):
    """Table 1 methods that export per-tile attention and ran on `dataset`."""
    from slidetrain.models import REGISTRY

    return [
        m
        for m in config["table1"]["methods"]
        if REGISTRY[m].model_cls.has_attention and table1_applicable(m, dataset)
    ]


def is_synthetic(dataset):
    return bool((SHEETS[dataset].source == SYNTHETIC).all())
