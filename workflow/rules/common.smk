# Sheets, wildcard constraints and input functions. Every sheet is read (and validated) at parse time,
# so every shard of slides is known at parse time and the DAG needs no checkpoints.
# What they compute lives in slidetrain.workflow (tested without Snakemake); this file binds it to `config`.
import json  # the rule files build JSON parameters
from pathlib import Path

from slidetrain.data.download import SLIDE_EXTENSIONS  # download.smk's wildcard constraint
from slidetrain.errors import SlidetrainError
from slidetrain.workflow import build_plan, method_regex
from slidetrain.workflow import params as _params
from slidetrain.workflow import runs as _runs
from slidetrain.workflow import shard_jobs as _shard_jobs
from slidetrain.workflow import pretrain_jobs as _pretrain_jobs
from slidetrain.workflow import slide_files as _slide_files
from slidetrain.workflow import tilebag_params as _tilebag
from snakemake.utils import validate as _validate_rows

try:
    PLAN = build_plan(
        config, Path(workflow.basedir) / "workflow" / "schemas" / "sheet.schema.yaml", _validate_rows
    )
except SlidetrainError as err:  # a bad sheet or config block: its message, without a traceback
    raise WorkflowError(str(err))

SHEETS = PLAN.sheets
DERIVED = PLAN.derived
SHARDS = PLAN.shards
SPLITS = PLAN.splits
OFFICIAL = PLAN.official
SEEDS = PLAN.seeds
IMAGE_METHODS = PLAN.image_methods
MIL_METHODS = PLAN.mil_methods
ALL_METHODS = PLAN.all_methods
MAIN_SHEETS = PLAN.main_datasets()
REMOTE_DATASETS = _slide_files.remote_datasets(PLAN)
# Main datasets the pipeline preprocesses and encodes itself (not those of a features_dir other tools wrote)
PREPROCESSED_MAIN = [d for d in MAIN_SHEETS if PLAN.extracts_features(d)]
_method_regex = method_regex


wildcard_constraints:
    dataset="|".join([*SHEETS, *DERIVED]),
    slide=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    split=r"mccv\d+|official",
    seed=r"\d+",
    method=r"[a-z0-9_]+",
    encoder=r"[a-z0-9_]+",
    shard=r"h[01]*",


# Datasets, slides, splits
dataset_cfg = PLAN.dataset_cfg
base_dataset = PLAN.base_dataset
slide_ids = PLAN.slide_ids
dataset_split = PLAN.dataset_split


def slide_file(dataset, slide):
    return _slide_files.slide_file(PLAN, dataset, slide)


def is_synthetic(dataset):
    return _slide_files.is_synthetic(PLAN, dataset)


def slides_ready(dataset, slides=None):
    return _slide_files.slides_ready(PLAN, dataset, slides)


def images_dir(dataset):
    return f"results/{dataset}/images"


def paper_split_args(dataset, split):
    return _params.paper_split_args(PLAN, dataset, split)


def download_args(wildcards):
    return _params.download_args(PLAN, wildcards.dataset, wildcards.slide)


# Shards (workflow/rules/slides.smk, preprocess.smk, features.smk, bench.smk)
def manifests(dataset, step):
    return _shard_jobs.manifests(PLAN, dataset, step)


def features_step(encoder=None):
    return _shard_jobs.features_step(PLAN, encoder)


def shard_members(wildcards):
    return _shard_jobs.shard_members(PLAN, wildcards.dataset, wildcards.shard)


def shard_slide_inputs(wildcards):
    return _shard_jobs.shard_slide_inputs(PLAN, wildcards.dataset, wildcards.shard)


def shard_slides_arg(wildcards):
    return _shard_jobs.shard_slides_arg(PLAN, wildcards.dataset, wildcards.shard)


def synthesize_shard_args(wildcards):
    return _shard_jobs.synthesize_shard_args(PLAN, wildcards.dataset, wildcards.shard)


def bench_shard():
    return _shard_jobs.bench_shard(PLAN)


# Per-slide rules take one params function each: Snakemake inspects every function per job,
# which dominates planning at 10,000+ slides. The strings are computed once per dataset.
_PREPROCESS_ARGS = _params.preprocess_args_by_dataset(PLAN)


def preprocess_args(wildcards, dataset_block=None, on_bad_slide=None):
    if dataset_block is not None:
        return _params.preprocess_args(config["preprocess"], dataset_block, on_bad_slide)
    return _PREPROCESS_ARGS[wildcards.dataset]


def mpp_arg(wildcards):
    return _params.mpp_arg(PLAN, wildcards.dataset)


def qc_status_inputs(wildcards):
    return _params.qc_status_source(PLAN, wildcards.dataset)[1]


def qc_status_option(wildcards):
    return _params.qc_status_source(PLAN, wildcards.dataset)[0]


def qc_picture_inputs(wildcards):
    # a features_dir dataset is not preprocessed and excludes no slide: no QC pictures to wait for
    return manifests(wildcards.dataset, "preprocess") if PLAN.extracts_features(wildcards.dataset) else []


# Training runs and tables (workflow/rules/train.smk, tables.smk)
def feature_index(wildcards):
    return _params.feature_index(PLAN, wildcards.dataset)


def preprocessed_for_slides(wildcards):
    return _params.preprocessed_for_slides(PLAN, wildcards.dataset)


def features_dir(wildcards):
    return _params.features_dir(PLAN, wildcards.dataset)


def external_features_dir(wildcards):
    return _params.external_features_dir(PLAN, wildcards.dataset)


def method_params(method):
    return _params.method_params(PLAN, method)


def weights_files(params):
    return _params.weights_files(params)


# Pretraining (workflow/rules/pretrain.smk)
def pretrain_cohort_manifests(wildcards):
    return manifests(_pretrain_jobs.pretrain_cohort(PLAN), "preprocess")


def pretrain_cohort_args(wildcards):
    return _pretrain_jobs.cohort_args(PLAN, _pretrain_jobs.pretrain_cohort(PLAN))


def pretrain_probe_args(wildcards):
    return _pretrain_jobs.probe_args(PLAN)


def pretrain_probe_split(wildcards):
    return _pretrain_jobs.probe_split(PLAN)


def pretrain_probe_manifests(wildcards):
    return manifests(config["pretrain"]["probe"]["dataset"], "preprocess")


def _image_device():
    return _params.image_device(PLAN)


def runs_of(dataset, method):
    return _runs.runs_of(PLAN, dataset, method)


def table1_metrics(wildcards):
    return _runs.table1_metrics(PLAN)


def table1_applicable(method, dataset):
    return _runs.table1_applicable(PLAN, method, dataset)


def table4_metrics(wildcards):
    return _runs.table4_metrics(PLAN)


def attention_methods(dataset):
    return _runs.attention_methods(PLAN, dataset)


def difficulty_probe_runs():
    return _runs.difficulty_probe_runs(PLAN)


# Benchmarks (workflow/rules/bench.smk)
def _bench_cfg(key, default=None):
    return config.get("bench", {}).get(key, default)


_INFERENCE_SLIDES = _params.inference_slides(PLAN)


# Tile-bag end-to-end (workflow/rules/tilebag.smk)
TILEBAG_SPLITS = _runs.tilebag_splits(PLAN)


def _tilebag_cfg(key, default=None):
    return _tilebag.tilebag_cfg(PLAN, key, default)


def tilebag_data_args(wildcards):
    return _tilebag.tilebag_data_args(PLAN, wildcards.dataset)


def tilebag_slides(wildcards):
    # a features_dir dataset's status does not wait for its tiles: the preprocess manifests do
    return slides_ready(base_dataset(wildcards.dataset)) + preprocessed_for_slides(wildcards)


def _tilebag_threads():
    return _tilebag.tilebag_threads(PLAN)


def _tilebag_runs(kind):
    # called by input functions, so the CPU probe behind the left-out runs runs only for tile-bag targets
    return _runs.tilebag_runs(PLAN, kind, _tilebag.tilebag_emulated_amp(PLAN))


def _tilebag_not_run_args(wildcards):
    return _tilebag.tilebag_not_run_args(PLAN)


def _tilebag_strategy(w):
    return _tilebag.tilebag_strategy(w.tilebag_run)


def tilebag_run_params(w):
    return _tilebag.tilebag_run_params(PLAN, w.tilebag_run)


def _tilebag_nproc():
    return _tilebag.tilebag_nproc(PLAN)


def _tilebag_cuda():
    return _tilebag.tilebag_cuda(PLAN)


def _step_slides(wildcards=None):
    return _tilebag.step_slides(PLAN)


# Distributed end-to-end (workflow/rules/distributed.smk)
DISTRIBUTED_BENCH = _tilebag.distributed_bench(PLAN)
DISTRIBUTED_CASES = list(DISTRIBUTED_BENCH.get("equivalence", {}))
DISTRIBUTED_FLOAT32_CASES = _tilebag.distributed_float32_cases(PLAN)
DISTRIBUTED_SCALING = DISTRIBUTED_BENCH.get("scaling", {})


def _distributed_spec(case):
    return _tilebag.distributed_spec(PLAN, case)


def _distributed_nproc(case):
    return _tilebag.distributed_nproc(PLAN, case)


def _scaling_spec(n):
    return _tilebag.scaling_spec(PLAN, n)


def _gpus(nproc):
    return _tilebag.distributed_gpus(PLAN, nproc)
