# Sheets, wildcard constraints and input functions. Every sheet is read (and validated) at parse time,
# so every shard of slides is known at parse time and the DAG needs no checkpoints.
import json
import re as _re

from slidetrain.data.download import SLIDE_EXTENSIONS, is_remote, remote_ext
from slidetrain.data.sheet import SYNTHETIC, local_path, read_sheet, validate_sheet
from slidetrain.configs import METHODS, check_method_config, image_methods
from slidetrain.errors import SlidetrainError
from snakemake.utils import validate as validate_rows
from pathlib import Path


def _validate_sheet(sheet):
    """The sheet schema, checked column-wise (jsonschema per row costs ~1.5 s at 10,000 slides).

    Only rows that fail the vectorised check go through jsonschema, which then raises its usual
    error; a schema using keywords beyond type/pattern/minLength is checked row by row as before.
    """
    import re
    import yaml

    schema_path = Path(workflow.basedir) / "workflow" / "schemas" / "sheet.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    props = schema.get("properties", {})
    if any(set(p) - {"type", "pattern", "minLength", "description"} for p in props.values()) or any(
        p.get("type", "string") != "string" for p in props.values()
    ) or set(schema) - {"$schema", "description", "type", "properties", "required"}:
        validate_rows(sheet, "../schemas/sheet.schema.yaml")
        return
    bad = None
    for column in schema.get("required", []):
        if column not in sheet.columns:
            validate_rows(sheet.head(1), "../schemas/sheet.schema.yaml")  # names the missing column
    for column, spec in props.items():
        if column not in sheet.columns:
            continue
        values = sheet[column]
        ok = values.map(lambda v: isinstance(v, str))
        if "minLength" in spec:
            ok &= values.astype(str).str.len() >= spec["minLength"]
        if "pattern" in spec:
            ok &= values.astype(str).map(lambda v, rx=re.compile(spec["pattern"]): rx.search(v) is not None)
        bad = ~ok if bad is None else bad | ~ok
    if bad is not None and bad.any():
        validate_rows(sheet[bad], "../schemas/sheet.schema.yaml")


def _load_sheets():
    sheets = {}
    for name, ds in config["datasets"].items():
        try:
            sheet = read_sheet(ds["sheet"], ds["classes"])
        except SlidetrainError as err:
            raise WorkflowError(f"datasets.{name}.sheet: {err}")
        _validate_sheet(sheet)
        sheets[name] = sheet.set_index("slide_id", drop=False)
    return sheets


SHEETS = _load_sheets()


def _load_derived():
    """Derived datasets: a dataset's slides under a label map (binary from graded, ...), no new slides.

    They reuse the source dataset's slides, tiles, features and QC; only splits and runs are their own.
    """
    derived = config.get("derived_datasets", {}) or {}
    for name, block in derived.items():
        base = block["from"]
        if name in SHEETS:
            raise WorkflowError(f"derived_datasets.{name}: the name is already a dataset under `datasets`")
        if base not in SHEETS:
            raise WorkflowError(f"derived_datasets.{name}.from: {base!r} is not a dataset; known: {sorted(SHEETS)}")
        unmapped = sorted(set(config["datasets"][base]["classes"]) - set(block["label_map"]))
        if unmapped:
            raise WorkflowError(f"derived_datasets.{name}.label_map: no target for class(es) {unmapped} of {base}")
        unknown = sorted(set(block["label_map"].values()) - set(block["classes"]))
        if unknown:
            raise WorkflowError(
                f"derived_datasets.{name}.label_map: target(s) {unknown} are not among its classes {block['classes']}"
            )
    return derived


DERIVED = _load_derived()
SPLITS = [f"mccv{i}" for i in range(config["splits"]["mccv_folds"])]
OFFICIAL = config["splits"].get("official", {})
SEEDS = [str(s) for s in config["seeds"]]

# Two trainers share the run layout: MIL aggregators on cached features, whole-image learners on the
# 5x (or configured) slide images. Each rule accepts only its own methods (wildcard constraints).
IMAGE_METHODS = sorted(m for m in config["methods"] if m in image_methods())
MIL_METHODS = sorted(m for m in config["methods"] if m not in IMAGE_METHODS)
ALL_METHODS = sorted(config["methods"])


def _method_regex(methods):
    # A never-matching pattern when a config has no method of this kind (an empty alternation matches "").
    return "|".join(methods) if methods else "(?!x)x"


def _check_methods():
    """Every method a table asks for has a config block that its dataclass accepts (fail before any job runs).

    slidetrain.configs holds the config dataclasses without torch: planning stays cheap."""

    for table in ("table1", "table4"):
        for method in config.get(table, {}).get("methods", []):
            if method not in config["methods"]:
                raise WorkflowError(
                    f"{table}.methods names {method!r}, which has no block under `methods`; known: {ALL_METHODS}"
                )
    for method, params in config["methods"].items():
        try:
            check_method_config(method, params)
        except SlidetrainError as err:
            raise WorkflowError(f"config: {err}")


_check_methods()


wildcard_constraints:
    dataset="|".join([*SHEETS, *DERIVED]),
    slide=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    split=r"mccv\d+|official",
    seed=r"\d+",
    method=r"[a-z0-9_]+",
    encoder=r"[a-z0-9_]+",
    shard=r"h[01]*",


def dataset_cfg(dataset):
    if dataset in DERIVED:  # the source's block (sheet, mpp_fallback, ...) with the derived labels
        block = DERIVED[dataset]
        return {**config["datasets"][block["from"]], "paper_name": None, "ordinal": False, **block}
    return config["datasets"][dataset]


def base_dataset(dataset):
    """The dataset whose slides, tiles and features `dataset` uses (itself unless derived)."""
    return DERIVED[dataset]["from"] if dataset in DERIVED else dataset


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


def feature_index(wildcards):
    """Training jobs depend on the dataset's feature index, one file, not one per slide (DAG size)."""
    return f"results/{base_dataset(wildcards.dataset)}/features/{config['features']['encoder']}/index.csv"


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
    for key in ("tile_foreground", "foreground_grey_range"):  # only when set: the default's jobs stay as they are
        if key in p:
            params[key] = p[key]
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
    return not (METHODS[method].binary_only and len(dataset_cfg(dataset)["classes"]) != 2)


def attention_methods(dataset):
    """Table 1 methods that export per-tile attention and ran on `dataset`."""
    return [
        m
        for m in config["table1"]["methods"]
        if m in MIL_METHODS and METHODS[m].has_attention and table1_applicable(m, dataset)
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


# Tile-bag end-to-end (workflow/rules/tilebag.smk)
def _tilebag_cfg(key, default=None):
    return config.get("tilebag", {}).get(key, default)


TILEBAG_SPLITS = SPLITS[: _tilebag_cfg("splits", len(SPLITS))]


def tilebag_data_args(wildcards):
    base = base_dataset(wildcards.dataset)
    ds = dataset_cfg(wildcards.dataset)
    args = (
        f"--sheet {dataset_cfg(base)['sheet']} --slides-dir resources/{base}/slides --tiles-dir results/{base}/tiles"
        f" --classes {' '.join(ds['classes'])}"
    )
    return args + (" --ordinal" if ds.get("ordinal") else "")


def tilebag_slides(wildcards):
    return slides_ready(base_dataset(wildcards.dataset))


def _tilebag_threads():
    # one torch thread for the step, plus the reader worker processes
    return 1 + int(_tilebag_cfg("params", {}).get("workers", 2))


def _tilebag_runs(kind):
    """metrics.json (kind "metrics") or history.csv of the K sweep, then the frozen-feature MIL runs."""
    name = "metrics.json" if kind == "metrics" else "history.csv"
    # the K sweep (single), then the other strategies at tilebag.strategy_k (tilebag_{strategy}_k{K})
    runs = [f"tilebag_k{k}" for k in _tilebag_cfg("k_sweep", [])]
    runs += [f"tilebag_{s}_k{k}" for s in _tilebag_cfg("strategies", {}) for k in _tilebag_cfg("strategy_k", [])]
    files = expand(
        "results/{dataset}/runs/{run}/{split}/{seed}/{name}",
        dataset=_tilebag_cfg("datasets", []), run=runs, split=TILEBAG_SPLITS, seed=SEEDS, name=name,
    )
    if kind == "metrics":
        files += expand(
            "results/{dataset}/runs/{method}/{split}/{seed}/metrics.json",
            dataset=_tilebag_cfg("datasets", []), method=_tilebag_cfg("frozen_methods", []), split=TILEBAG_SPLITS, seed=SEEDS,
        )
    return files


def _tilebag_strategy(w):
    """(strategy, K) of a run directory name: tilebag_k16 -> (single, 16), tilebag_half_k16 -> (half, 16)."""
    m = _re.fullmatch(r"tilebag(?:_(half|parallel))?_k(\d+)", w.tilebag_run)
    return m[1] or "single", int(m[2])


def tilebag_run_params(w):
    """The run's TileBagConfig keys: tilebag.params, the strategy's keys (tilebag.strategies), its K."""
    strategy, k = _tilebag_strategy(w)
    return json.dumps({**_tilebag_cfg("params", {}), **_tilebag_cfg("strategies", {}).get(strategy, {}), "k": k})


def _tilebag_nproc():
    return int(_tilebag_cfg("parallel", {}).get("n_encoder_ranks", 2)) + 1  # rank 0 aggregates, ranks 1..N encode


def _tilebag_cuda():
    return str(_tilebag_cfg("params", {}).get("device", "cpu")).startswith("cuda")


def _step_slides(wildcards=None):
    dataset = base_dataset(_tilebag_cfg("datasets", ["synthetic"])[0])
    return {s: slide_file(dataset, s) for s in slide_ids(dataset)[: _tilebag_cfg("step", {}).get("slides", 8)]}
# Distributed end-to-end (workflow/rules/distributed.smk)
DISTRIBUTED_BENCH = config.get("distributed_benchmark", {})
DISTRIBUTED_CASES = list(DISTRIBUTED_BENCH.get("equivalence", {}))
# float32 cases get a float64 single run beside them (the reference's own rounding)
DISTRIBUTED_FLOAT32_CASES = [c for c in DISTRIBUTED_CASES if DISTRIBUTED_BENCH["equivalence"][c].get("dtype", "float32") == "float32"]
DISTRIBUTED_SCALING = DISTRIBUTED_BENCH.get("scaling", {})


def _distributed_spec(case):
    return {**DISTRIBUTED_BENCH["equivalence"][case], "device": DISTRIBUTED_BENCH.get("device", "cpu")}


def _distributed_nproc(case):
    return DISTRIBUTED_BENCH["ranks"][case] + 1  # rank 0 aggregates, ranks 1..N encode


def _scaling_spec(n):
    k = DISTRIBUTED_SCALING["k_per_rank"]
    return {**DISTRIBUTED_SCALING["spec"], "tiles": int(n) * k, "device": DISTRIBUTED_BENCH.get("device", "cpu")}


def _gpus(nproc):
    return nproc if DISTRIBUTED_BENCH.get("device", "cpu") == "cuda" else 0
# Shards: per-slide work runs one job per fixed group of a dataset's slides (slidetrain.data.shards);
# per-slide outputs keep their paths, and the shard's manifest is what Snakemake tracks.
from slidetrain.data.shards import assign_shards
from shlex import quote as _quote

SLIDES_PER_SHARD = config.get("shards", {}).get("slides_per_shard", 32)
SHARDS = {d: assign_shards(slide_ids(d), SLIDES_PER_SHARD) for d in SHEETS}


def manifests(dataset, step):
    """Every shard manifest of one step (preprocess, synthesize, features/{encoder}) of a dataset."""
    return [f"results/{dataset}/shards/{step}/{shard}.tsv" for shard in SHARDS[dataset]]


def features_step(encoder=None):
    return f"features/{encoder or config['features']['encoder']}"


def shard_members(wildcards):
    try:
        return SHARDS[wildcards.dataset][wildcards.shard]
    except KeyError:
        raise WorkflowError(
            f"dataset {wildcards.dataset!r} has no shard {wildcards.shard!r} at shards.slides_per_shard ="
            f" {SLIDES_PER_SHARD}; its shards: {sorted(SHARDS.get(wildcards.dataset, {}))}"
        )


def _synthetic_members(wildcards):
    sources = SHEETS[wildcards.dataset].source
    return [s for s in shard_members(wildcards) if sources.at[s] == SYNTHETIC]


def shard_slide_inputs(wildcards):
    """The shard's slides: its synthesis manifest for drawn slides, the files themselves otherwise."""
    members = shard_members(wildcards)
    synthetic = set(_synthetic_members(wildcards))
    files = [slide_file(wildcards.dataset, s) for s in members if s not in synthetic]
    if synthetic:
        files.append(f"results/{wildcards.dataset}/shards/synthesize/{wildcards.shard}.tsv")
    return files


def slides_ready(dataset, slides=None):
    """Inputs that guarantee the slide files exist: drawn slides through their shards' synthesis
    manifests (the per-slide .tiff is not a rule output), other slides as the files themselves."""
    slides = slide_ids(dataset) if slides is None else slides
    sources = SHEETS[dataset].source
    shard_of = {m: sh for sh, members in SHARDS[dataset].items() for m in members}
    files, shards = [], set()
    for slide in slides:
        if sources.at[slide] == SYNTHETIC:
            shards.add(shard_of[slide])
        else:
            files.append(slide_file(dataset, slide))
    return files + [f"results/{dataset}/shards/synthesize/{sh}.tsv" for sh in sorted(shards)]


def shard_slides_arg(wildcards):
    """--slides id=path ... for the shard's members (quoted for the shell)."""
    return " ".join(_quote(f"{s}={slide_file(wildcards.dataset, s)}") for s in shard_members(wildcards))


def synthesize_shard_args(wildcards):
    ds = dataset_cfg(wildcards.dataset)
    labels = SHEETS[wildcards.dataset].label
    slides = " ".join(_quote(f"{s}={labels.at[s]}") for s in _synthetic_members(wildcards))
    size = " ".join(map(str, ds["synthetic_size_range_px"]))
    stain = " ".join(map(str, ds["synthetic_stain_scale"])) if ds.get("synthetic_stain_scale") else ""
    return f"--slides {slides} --seed {ds['synthetic_seed']} --size-range-px {size}" + (
        f" --stain-scale {stain}" if stain else ""
    )


def bench_shard():
    """(dataset, shard) timed by the feature-throughput benchmark: the first shard of Table 1's first dataset."""
    dataset = config["table1"]["datasets"][0]
    return dataset, next(iter(SHARDS[dataset]))
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
# Datasets of the main job's QC table and preprocessing benchmark: all but the test-only cohorts
# (`test_only: true`, e.g. Big-Layers' external cohort, built only by the targets that test on it).
MAIN_SHEETS = [d for d in SHEETS if not config["datasets"][d].get("test_only", False)]
