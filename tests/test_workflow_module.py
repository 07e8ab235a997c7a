"""slidetrain.workflow without a Snakemake run: sheet checks, the plan, shard jobs, run lists, rule params.

The workflow's .smk files only bind these functions to `config`; a tiny config here (two sheets in a
temporary folder) exercises what a dry run would, and names the key or slide when the input is bad.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from slidetrain.data.shards import assign_shards
from slidetrain.errors import ConfigError, SheetError
from slidetrain.workflow import (
    build_plan,
    method_regex,
    params,
    runs,
    shard_jobs,
    slide_files,
    tilebag_params,
)
from slidetrain.workflow import offload_table_jobs as offload_jobs
from slidetrain.workflow.sheets import check_sheet, is_columnwise

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "sheet.schema.yaml"
GRADES = ["normal", "low_grade", "high_grade"]


def _no_row_validation(sheet, schema_path):  # the column-wise check found nothing: never called
    raise AssertionError(f"rows sent to jsonschema: {sheet.slide_id.tolist()}")


def _write_sheet(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    text = "slide_id\tpatient_id\tlabel\tsource\n" + "".join("\t".join(r) + "\n" for r in rows)
    path.write_text(text)
    return path


@pytest.fixture
def config(tmp_path) -> dict:
    """Two datasets: `graded` (three drawn slides, one local file, one remote) and `ext` (drawn), a
    binary dataset derived from `graded`, one MIL, one binary-only and one whole-image method."""
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "local 1.svs").write_bytes(b"")
    graded = _write_sheet(
        tmp_path / "graded.tsv",
        [
            ("syn_0", "p0", "normal", "synthetic"),
            ("syn_1", "p1", "low_grade", "synthetic"),
            ("syn_2", "p2", "high_grade", "synthetic"),
            ("loc_3", "p3", "normal", "slides/local 1.svs"),
            ("rem_4", "p4", "high_grade", "gdc:0000-aaaa"),
        ],
    )
    ext = _write_sheet(
        tmp_path / "ext.tsv", [("ext_0", "q0", "normal", "synthetic"), ("ext_1", "q1", "high_grade", "synthetic")]
    )
    return {
        "datasets": {
            "graded": {
                "sheet": str(graded),
                "classes": GRADES,
                "ordinal": True,
                "mpp_fallback": 0.5,
                "synthetic_seed": 3,
                "synthetic_size_range_px": [100, 200],
                "split": {"counts": [3, 1, 1], "fixed_test": True},
            },
            "ext": {
                "sheet": str(ext),
                "classes": GRADES,
                "synthetic_seed": 4,
                "synthetic_size_range_px": [100, 200],
                "synthetic_stain_scale": [1.25, 0.8],
                "test_only": True,
                "split": {"mccv": False},
            },
        },
        "derived_datasets": {
            "binary": {
                "from": "graded",
                "classes": ["benign", "tumour"],
                "label_map": {"normal": "benign", "low_grade": "tumour", "high_grade": "tumour"},
            },
        },
        "preprocess": {
            "mask_preset": "default",
            "target_magnification": 5.0,
            "tile_px": 128,
            "overlap_px": 0,
            "min_tissue_fraction": 0.5,
            "image_magnification": 1.25,
            "on_bad_slide": "exclude",
        },
        "features": {"encoder": "resnet34"},
        "splits": {"mccv_folds": 3, "official": {"graded": {}}},
        "seeds": [0, 1],
        "methods": {"abmil": {}, "milrnn": {}, "local_k4": {}},
        "training": {"whole_image_splits": 1},
        "table1": {"datasets": ["graded", "binary"], "methods": ["abmil", "milrnn", "local_k4"]},
        "table4": {"datasets": ["binary"], "methods": ["abmil"]},
        "shards": {"slides_per_shard": 2},
    }


@pytest.fixture
def plan(config):
    return build_plan(config, SCHEMA, _no_row_validation)


# --- sheets -------------------------------------------------------------------------------------------


def _sheet(**columns) -> pd.DataFrame:
    base = {"slide_id": ["a", "b"], "patient_id": ["p", "q"], "label": ["x", "y"], "source": ["synthetic"] * 2}
    return pd.DataFrame({**base, **columns})


def test_the_project_sheet_schema_is_checked_column_wise():
    assert is_columnwise(yaml.safe_load(SCHEMA.read_text()))
    assert not is_columnwise({"properties": {"size": {"type": "integer"}}})
    assert not is_columnwise({"properties": {"slide_id": {"type": "string", "enum": ["a"]}}})


def test_only_the_rows_that_fail_the_column_check_go_to_jsonschema():
    seen = []
    check_sheet(_sheet(), SCHEMA, lambda rows, path: seen.append(rows))
    assert seen == []
    check_sheet(_sheet(slide_id=["a", "-bad"], md5=["", "xyz"]), SCHEMA, lambda rows, path: seen.append(rows))
    assert [rows.slide_id.tolist() for rows in seen] == [["-bad"]]


def test_a_missing_required_column_reaches_jsonschema_which_names_it():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError, match="patient_id"):
        check_sheet(_sheet().drop(columns="patient_id"), SCHEMA, validate)


def test_a_bad_row_is_rejected_by_jsonschema_with_its_value():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError, match="-bad"):
        check_sheet(_sheet(slide_id=["a", "-bad"]), SCHEMA, validate)


def test_a_schema_beyond_the_column_check_is_validated_row_by_row(tmp_path):
    schema = tmp_path / "s.yaml"
    schema.write_text(yaml.safe_dump({"type": "object", "properties": {"slide_id": {"type": "string", "enum": ["a"]}}}))
    seen = []
    check_sheet(_sheet(), schema, lambda rows, path: seen.append((len(rows), path)))
    assert seen == [(2, str(schema))]


def test_a_missing_sheet_names_its_dataset_key(config):
    config["datasets"]["graded"]["sheet"] = "/nonexistent/sheet.tsv"
    with pytest.raises(ConfigError, match=r"datasets\.graded\.sheet: .*nonexistent"):
        build_plan(config, SCHEMA, _no_row_validation)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["derived_datasets"]["binary"].update({"from": "nope"}), r"derived_datasets\.binary\.from: 'nope'"),
        (
            lambda c: c["derived_datasets"]["binary"]["label_map"].pop("low_grade"),
            r"derived_datasets\.binary\.label_map: no target for class\(es\) \['low_grade'\]",
        ),
        (
            lambda c: c["derived_datasets"]["binary"]["label_map"].update({"normal": "healthy"}),
            r"target\(s\) \['healthy'\] are not among its classes",
        ),
        (
            lambda c: c["derived_datasets"].update({"ext": {"from": "graded", "classes": [], "label_map": {}}}),
            r"derived_datasets\.ext: the name is already a dataset",
        ),
        (lambda c: c["table1"]["methods"].append("nosuchmil"), r"table1\.methods names 'nosuchmil'"),
        (lambda c: c["methods"]["abmil"].update({"no_such_key": 1}), r"config: .*no_such_key"),
    ],
)
def test_a_bad_config_block_names_its_key(config, change, message):
    change(config)
    with pytest.raises(ConfigError, match=message):
        build_plan(config, SCHEMA, _no_row_validation)


# --- the plan ------------------------------------------------------------------------------------------


def test_plan_knows_sheets_splits_seeds_and_methods(plan):
    assert list(plan.sheets) == ["graded", "ext"] and list(plan.derived) == ["binary"]
    assert plan.sheets["graded"].loc["loc_3", "patient_id"] == "p3"  # indexed by slide_id
    assert plan.splits == ["mccv0", "mccv1", "mccv2"] and plan.seeds == ["0", "1"]
    assert plan.image_methods == ["local_k4"] and plan.mil_methods == ["abmil", "milrnn"]
    assert plan.splits_of("graded") == ["mccv0", "mccv1", "mccv2", "official"]
    assert plan.splits_of("binary") == ["mccv0", "mccv1", "mccv2"]
    assert plan.splits_of("ext") == ["official"]  # split.mccv: false
    assert plan.main_datasets() == ["graded"]  # ext is test_only


def test_a_derived_dataset_is_its_source_under_its_own_labels(plan):
    cfg = plan.dataset_cfg("binary")
    assert cfg["classes"] == ["benign", "tumour"] and cfg["ordinal"] is False and cfg["paper_name"] is None
    assert cfg["sheet"] == plan.config["datasets"]["graded"]["sheet"] and cfg["mpp_fallback"] == 0.5
    assert plan.base_dataset("binary") == "graded" and plan.base_dataset("graded") == "graded"


def test_shards_are_the_stable_assignment_at_the_configured_size(plan):
    assert plan.shards["graded"] == assign_shards(plan.slide_ids("graded"), 2)
    assert all(len(members) <= 2 for members in plan.shards["graded"].values())
    assert sorted(s for m in plan.shards["graded"].values() for s in m) == sorted(plan.slide_ids("graded"))


def test_method_regex_never_matches_when_empty():
    assert re.fullmatch(method_regex(["abmil", "gma"]), "gma")
    assert not re.fullmatch(method_regex([]), "") and not re.fullmatch(method_regex([]), "abmil")


# --- slide files and shard jobs --------------------------------------------------------------------------


def test_slide_files_by_source(plan, tmp_path):
    assert slide_files.slide_file(plan, "graded", "syn_0") == "resources/graded/slides/syn_0.tiff"
    assert slide_files.slide_file(plan, "graded", "rem_4").startswith("resources/graded/slides/rem_4.")
    assert slide_files.slide_file(plan, "graded", "loc_3") == str(tmp_path / "slides" / "local 1.svs")
    assert slide_files.remote_datasets(plan) == ["graded"]
    assert slide_files.is_synthetic(plan, "ext") and not slide_files.is_synthetic(plan, "graded")


def test_an_unknown_slide_names_slide_and_dataset(plan):
    with pytest.raises(SheetError, match=r"slide 'nope' is not in the sheet of dataset 'graded'"):
        slide_files.slide_file(plan, "graded", "nope")


def test_slides_ready_takes_drawn_slides_through_their_synthesis_manifests(plan):
    shard_of = {m: sh for sh, members in plan.shards["graded"].items() for m in members}
    ready = slide_files.slides_ready(plan, "graded", ["syn_0", "syn_1", "loc_3"])
    expected_shards = sorted({shard_of["syn_0"], shard_of["syn_1"]})
    assert ready == [slide_files.slide_file(plan, "graded", "loc_3")] + [
        f"results/graded/shards/synthesize/{sh}.tsv" for sh in expected_shards
    ]
    assert len(slide_files.slides_ready(plan, "ext")) == len(plan.shards["ext"])


def test_shard_jobs_inputs_and_arguments(plan):
    shard_of = {m: sh for sh, members in plan.shards["graded"].items() for m in members}
    assert shard_jobs.manifests(plan, "graded", "preprocess") == [
        f"results/graded/shards/preprocess/{sh}.tsv" for sh in plan.shards["graded"]
    ]
    local = shard_of["loc_3"]
    members = shard_jobs.shard_members(plan, "graded", local)
    inputs = shard_jobs.shard_slide_inputs(plan, "graded", local)
    assert slide_files.slide_file(plan, "graded", "loc_3") in inputs
    drawn = [s for s in members if s.startswith("syn_")]
    assert (f"results/graded/shards/synthesize/{local}.tsv" in inputs) == bool(drawn)
    # the local file's name has a space: one shell word per slide
    words = shlex.split(shard_jobs.shard_slides_arg(plan, "graded", local))
    assert words == [f"{s}={slide_files.slide_file(plan, 'graded', s)}" for s in members]
    assert (
        shard_jobs.features_step(plan) == "features/resnet34"
        and shard_jobs.features_step(plan, "uni") == "features/uni"
    )
    assert shard_jobs.bench_shard(plan) == ("graded", next(iter(plan.shards["graded"])))


def test_synthesize_args_list_only_drawn_slides_with_labels_and_stain(plan):
    shard = next(iter(plan.shards["ext"]))
    args = shard_jobs.synthesize_shard_args(plan, "ext", shard)
    labels = plan.sheets["ext"].label
    assert args.startswith("--slides " + " ".join(f"{s}={labels[s]}" for s in plan.shards["ext"][shard]))
    assert args.endswith("--seed 4 --size-range-px 100 200 --stain-scale 1.25 0.8")
    local = next(sh for sh, m in plan.shards["graded"].items() if "loc_3" in m)
    assert "loc_3" not in shard_jobs.synthesize_shard_args(plan, "graded", local)


def test_synthesize_args_name_a_difficulty_other_than_classic_only(config):
    """Classic adds no argument, so the rule's parameters (a rerun trigger) are what they were before."""
    config["datasets"]["graded"]["synthetic_difficulty"] = "classic"
    plan = build_plan(config, SCHEMA, _no_row_validation)
    shard = next(sh for sh, m in plan.shards["graded"].items() if "syn_0" in m)
    assert "--difficulty" not in shard_jobs.synthesize_shard_args(plan, "graded", shard)
    config["datasets"]["graded"]["synthetic_difficulty_overrides"] = {"n_sites": 2, "lesion_fraction": [0.02, 0.05]}
    config["datasets"]["graded"]["synthetic_difficulty"] = "hard"
    args = shlex.split(
        shard_jobs.synthesize_shard_args(build_plan(config, SCHEMA, _no_row_validation), "graded", shard)
    )
    assert args[args.index("--difficulty") + 1] == "hard"
    overrides = json.loads(args[args.index("--difficulty-overrides") + 1])
    assert overrides == {"lesion_fraction": [0.02, 0.05], "n_sites": 2}


def test_difficulty_probe_runs_list_history_dirs_and_name_bad_keys(plan, config):
    config["datasets"]["graded"]["synthetic_difficulty"] = "moderate"
    config["difficulty_probe"] = {"datasets": ["graded"], "methods": ["abmil"], "splits": ["mccv1"]}
    probe = runs.difficulty_probe_runs(build_plan(config, SCHEMA, _no_row_validation))
    assert [(r["dataset"], r["difficulty"], r["method"], r["split"], r["seed"]) for r in probe] == [
        ("graded", "moderate", "abmil", "mccv1", "0"),
        ("graded", "moderate", "abmil", "mccv1", "1"),
    ]
    assert probe[1]["run_dir"] == "results/graded/runs/abmil/mccv1/1"
    for bad, message in (
        ({"datasets": ["synthetic"]}, r"difficulty_probe.datasets names \['synthetic'\]"),
        ({"datasets": ["graded"], "methods": ["local_k4"]}, r"difficulty_probe.methods \['local_k4'\]"),
        ({"datasets": ["graded"], "methods": ["abmil"], "splits": ["mccv7"]}, r"difficulty_probe.splits \['mccv7'\]"),
    ):
        config["difficulty_probe"] = bad
        with pytest.raises(ConfigError, match=message):
            runs.difficulty_probe_runs(build_plan(config, SCHEMA, _no_row_validation))


def test_an_unknown_shard_names_dataset_shard_and_the_shards_it_has(plan):
    with pytest.raises(ConfigError, match=r"dataset 'graded' has no shard 'h111111' at shards.slides_per_shard = 2"):
        shard_jobs.shard_members(plan, "graded", "h111111")


# --- run lists ------------------------------------------------------------------------------------------


def test_expand_matches_snakemake():
    from snakemake.io import expand as snakemake_expand

    kw = {"dataset": "d", "method": ["a", "b"], "split": ["mccv0", "official"], "seed": ["0", "1"]}
    pattern = "results/{dataset}/runs/{method}/{split}/{seed}/metrics.json"
    assert runs.expand(pattern, **kw) == snakemake_expand(pattern, **kw)


def test_runs_cover_splits_and_seeds_and_whole_image_methods_their_first_splits(plan):
    assert len(runs.runs_of(plan, "graded", "abmil")) == 4 * 2
    assert runs.runs_of(plan, "graded", "local_k4") == [
        "results/graded/runs/local_k4/mccv0/0/metrics.json",
        "results/graded/runs/local_k4/mccv0/1/metrics.json",
    ]


def test_table1_leaves_binary_only_methods_off_multiclass_datasets(plan):
    files = runs.table1_metrics(plan)
    assert not [f for f in files if "/graded/runs/milrnn/" in f]
    assert [f for f in files if "/binary/runs/milrnn/" in f]
    assert runs.attention_methods(plan, "graded") == ["abmil"]
    assert runs.table4_metrics(plan) == runs.runs_of(plan, "binary", "abmil")


def test_tilebag_runs(plan, config):
    config["tilebag"] = {
        "datasets": ["graded"],
        "splits": 1,
        "k_sweep": [8, 16],
        "strategies": {"half": {}},
        "strategy_k": [16],
        "frozen_methods": ["abmil"],
    }
    runs_dirs = {f.split("/")[3] for f in runs.tilebag_runs(plan, "metrics")}
    assert runs_dirs == {"tilebag_k8", "tilebag_k16", "tilebag_half_k16", "abmil"}
    history = runs.tilebag_runs(plan, "history")
    assert all(f.endswith("/mccv0/0/history.csv") or f.endswith("/mccv0/1/history.csv") for f in history)
    assert len(history) == 3 * 2


def test_tilebag_amp_runs_are_left_out_with_a_reason_where_bf16_is_emulated(plan, config, monkeypatch):
    from slidetrain.train import cpu_bf16

    config["tilebag"] = {
        "datasets": ["graded"],
        "splits": 1,
        "k_sweep": [16],
        "strategies": {"parallel": {"executor": "distributed"}, "half": {"amp": True}},
        "strategy_k": [16],
    }

    def run_dirs() -> set[str]:
        return {f.split("/")[3] for f in runs.tilebag_runs(plan, "metrics", tilebag_params.tilebag_emulated_amp(plan))}

    monkeypatch.setattr(cpu_bf16, "cpu_bf16", lambda: cpu_bf16.CpuBf16(True, "avx512_bf16"))
    assert run_dirs() == {"tilebag_k16", "tilebag_parallel_k16", "tilebag_half_k16"}
    assert tilebag_params.tilebag_not_run_args(plan) == ""

    monkeypatch.setattr(cpu_bf16, "cpu_bf16", lambda: cpu_bf16.CpuBf16(False, "no AVX512-BF16 or AMX (x86_64 CPU)"))
    assert run_dirs() == {"tilebag_k16", "tilebag_parallel_k16"}
    args = shlex.split(tilebag_params.tilebag_not_run_args(plan))
    assert args == [
        "--not-run",
        "tilebag_half_k16=bf16 autocast (amp) is emulated on this CPU: no AVX512-BF16 or AMX (x86_64 CPU)",
    ]

    def no_probe():
        raise AssertionError("the CPU is probed only for AMP on a CPU device")

    monkeypatch.setattr(cpu_bf16, "cpu_bf16", no_probe)
    config["tilebag"]["params"] = {"device": "cuda"}  # fp16 autocast on a GPU: nothing to leave out
    assert run_dirs() == {"tilebag_k16", "tilebag_parallel_k16", "tilebag_half_k16"}


# --- rule parameters ------------------------------------------------------------------------------------


def test_method_params_is_the_block_as_json_and_an_unknown_method_names_itself(plan):
    assert json.loads(params.method_params(plan, "abmil")) == {}
    with pytest.raises(ConfigError, match=r"method 'gma' has no block under `methods`"):
        params.method_params(plan, "gma")


def test_preprocess_args_add_optional_keys_only_when_set(plan, config):
    args = params.preprocess_args_by_dataset(plan)
    assert set(args) == {"graded", "ext"}
    p = json.loads(shlex.split(args["graded"])[1])
    assert p["mpp_fallback"] == 0.5 and "tile_foreground" not in p
    assert args["graded"].endswith("--on-bad-slide exclude")
    config["preprocess"]["tile_foreground"] = "grey"
    assert (
        json.loads(shlex.split(params.preprocess_args(config["preprocess"], {}, "error"))[1])["tile_foreground"]
        == "grey"
    )


def test_dataset_arguments(plan):
    assert params.mpp_arg(plan, "graded") == "--mpp-fallback 0.5" and params.mpp_arg(plan, "ext") == ""
    assert params.paper_split_args(plan, "graded", "mccv0") == "--counts 3 1 1 --fixed-test"
    assert params.paper_split_args(plan, "graded", "official") == ""
    assert params.feature_index(plan, "binary") == "results/graded/features/resnet34/index.csv"
    download = params.download_args(plan, "graded", "rem_4")
    assert download.startswith("--source 'gdc:0000-aaaa' --retries 5") and "--md5" not in download


def test_a_features_dir_dataset_reads_that_folder_and_is_not_preprocessed_for_table1(config, tmp_path):
    config["datasets"]["graded"]["features_dir"] = str(tmp_path / "trident")
    (tmp_path / "slides" / "local 1.svs").unlink()  # the features stand in for the slide files
    plan = build_plan(config, SCHEMA, _no_row_validation)
    assert not plan.extracts_features("graded") and not plan.extracts_features("binary")  # derived: its source's
    assert plan.extracts_features("ext")
    for dataset in ("graded", "binary"):
        assert params.feature_index(plan, dataset) == "results/graded/external_features/index.csv"
        assert params.features_dir(plan, dataset) == str(tmp_path / "trident")
    assert params.qc_status_source(plan, "graded") == (
        "--feature-index",
        ["results/graded/external_features/index.csv"],
    )
    # whole-image and tile-bag jobs still read tiles and images: they wait for the preprocessing
    assert params.preprocessed_for_slides(plan, "binary") == shard_jobs.manifests(plan, "graded", "preprocess")
    assert params.features_dir(plan, "ext") == "results/ext/features/resnet34"
    assert params.qc_status_source(plan, "ext")[0] == "--manifests"
    assert params.preprocessed_for_slides(plan, "ext") == []
    with pytest.raises(ConfigError, match=r"datasets\.ext\.features_dir"):
        params.external_features_dir(plan, "ext")


def test_tilebag_run_names_and_params(plan, config):
    assert tilebag_params.tilebag_strategy("tilebag_k16") == ("single", 16)
    assert tilebag_params.tilebag_strategy("tilebag_parallel_k4") == ("parallel", 4)
    with pytest.raises(ConfigError, match="tile-bag run 'tilebag_full_k4'"):
        tilebag_params.tilebag_strategy("tilebag_full_k4")
    config["tilebag"] = {
        "params": {"lr": 0.1, "k": 1},
        "strategies": {"half": {"lr": 0.2}},
        "datasets": ["binary"],
        "step": {"slides": 2},
    }
    assert json.loads(tilebag_params.tilebag_run_params(plan, "tilebag_half_k8")) == {"lr": 0.2, "k": 8}
    assert tilebag_params.tilebag_data_args(plan, "graded").endswith("--classes normal low_grade high_grade --ordinal")
    assert "--sheet " + config["datasets"]["graded"]["sheet"] in tilebag_params.tilebag_data_args(plan, "binary")
    assert list(tilebag_params.step_slides(plan)) == plan.slide_ids("graded")[:2]


def test_distributed_benchmark_params(plan, config):
    config["distributed_benchmark"] = {
        "device": "cpu",
        "ranks": {"toy": 2},
        "equivalence": {"toy": {"tiles": 4}, "wide": {"dtype": "float64"}},
        "scaling": {"k_per_rank": 3, "spec": {"arch": "toy"}},
    }
    assert tilebag_params.distributed_float32_cases(plan) == ["toy"]
    assert tilebag_params.distributed_spec(plan, "toy") == {"tiles": 4, "device": "cpu"}
    assert tilebag_params.distributed_nproc(plan, "toy") == 3
    assert tilebag_params.scaling_spec(plan, "4") == {"arch": "toy", "tiles": 12, "device": "cpu"}
    assert tilebag_params.distributed_gpus(plan, 3) == 0


# --- Big-Layers tables ----------------------------------------------------------------------------------


@pytest.fixture
def offload_plan(config):
    config["offload_tables"] = {
        "splits": 2,
        "params": {"epochs": 1},
        "encoders": {"frozen": {"encoder": "frozen"}, "trained": {}},
        "aggregators": ["abmil"],
        "aggregator_params": {"abmil": {"dim": 8}},
        "tables": {
            "offload_table1": {
                "dataset": "graded",
                "external": "ext",
                "metric": "auc",
                "eval_k": 4,
                "eval_repeats": 2,
                "params": {"epochs": 2},
                "paper": {"abmil": 0.9},
            }
        },
    }
    return build_plan(config, SCHEMA, _no_row_validation)


def test_offload_table_jobs(offload_plan):
    offload_jobs.check_offload_tables(offload_plan)
    p = json.loads(offload_jobs.biglayers_params(offload_plan, "graded", "frozen", "abmil", "noaug"))
    assert p == {
        "epochs": 2,
        "encoder": "frozen",
        "aggregator": "abmil",
        "aggregator_params": {"dim": 8},
        "augment": False,
    }
    tests = json.loads(offload_jobs.biglayers_tests(offload_plan, "graded", "mccv1"))
    assert [(t["name"], t["split"]) for t in tests] == [
        ("internal", "results/graded/splits/mccv1.csv"),
        ("external", "results/ext/splits/external.csv"),
    ]
    assert json.loads(offload_jobs.biglayers_modes(offload_plan, "graded"))["sampled"]["eval_k"] == 4
    metrics = offload_jobs.offload_table_metrics(offload_plan, "offload_table1")
    # 2 encoder modes x 2 splits x 2 seeds x 2 test sets x 2 tile modes
    assert len(metrics) == 32 and {f.split("/")[4] for f in metrics} == {"mccv0", "mccv1"}
    assert offload_jobs.offload_table_args(offload_plan, "offload_table1") == (
        "--metric auc --paper-table offload_table1 --test-datasets internal=graded external=ext"
        " --sampled-label 2x4 --paper abmil=0.9"
    )


def test_the_default_big_layers_arms_differ_only_in_training_the_encoder(monkeypatch):
    """Both arms' resolved run configs (what train_biglayers hands each job) share start and evaluation."""
    from slidetrain.configs.tilebag import tilebag_config

    monkeypatch.chdir(REPO)
    plan = build_plan(copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text())), SCHEMA)
    same = ("backbone", "weights", "input_px", "eval_tiles", "eval_k", "eval_repeats", "eval_chunk", "eval_bn")
    for block in plan.config["offload_tables"]["tables"].values():
        for agg in plan.config["offload_tables"]["aggregators"]:
            frozen, trained = (
                tilebag_config(json.loads(offload_jobs.biglayers_params(plan, block["dataset"], enc, agg, aug)))
                for enc, aug in (("frozen", "noaug"), ("trained", "noaug"))
            )
            assert {k: getattr(frozen, k) for k in same} == {k: getattr(trained, k) for k in same}
            assert (frozen.encoder, trained.encoder) == ("frozen", "trained")
    assert frozen.weights == "results/pretrain/resnet18/encoder.pt"
    # each slide's own statistics: running statistics left the trained arm at chance (config/config.yaml)
    assert frozen.eval_bn == trained.eval_bn == "bag"


def test_big_layers_arms_evaluated_differently_are_refused(offload_plan):
    offload_plan.config["offload_tables"]["encoders"]["trained"] = {"eval_bn": "bag"}
    with pytest.raises(ConfigError, match="frozen and trained arms differ in eval_bn"):
        offload_jobs.check_offload_tables(offload_plan)
    offload_plan.config["offload_tables"]["encoders"]["trained"] = {"weights": "other.pt"}
    with pytest.raises(ConfigError, match="differ in weights"):
        offload_jobs.check_offload_tables(offload_plan)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t["tables"]["offload_table1"].update({"external": "binary"}),
            r"offload_tables\.tables\.offload_table1\.external: 'binary' has classes \['benign', 'tumour'\]",
        ),
        (
            lambda t: t["tables"]["offload_table1"].update({"dataset": "nope"}),
            r"offload_tables\.tables\.offload_table1\.dataset: 'nope' is not a dataset",
        ),
        (
            lambda t: t["encoders"].update({"half": {}}),
            r"offload_tables\.encoders: 'half'; expected frozen and/or trained",
        ),
        (
            lambda t: t["params"].update({"no_such_key": 1}),
            r"offload_tables \(offload_table1, frozen, abmil\): .*no_such_key",
        ),
    ],
)
def test_a_bad_offload_table_block_names_its_key(offload_plan, change, message):
    change(offload_plan.config["offload_tables"])
    with pytest.raises(ConfigError, match=message):
        offload_jobs.check_offload_tables(offload_plan)


def test_a_dataset_of_no_table_is_an_error(offload_plan):
    with pytest.raises(ConfigError, match=r"offload_tables: dataset 'ext' is no table's `dataset`"):
        offload_jobs.biglayers_modes(offload_plan, "ext")


# --- the default config ----------------------------------------------------------------------------------


def test_the_default_config_plans(monkeypatch):
    """config/config.yaml as the workflow reads it (sheet paths relative to the repository)."""
    monkeypatch.chdir(REPO)
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    plan = build_plan(config, SCHEMA)
    offload_jobs.check_offload_tables(plan)
    assert "synthetic" in plan.sheets and plan.main_datasets() == ["synthetic"]
    assert sum(len(m) for m in plan.shards["synthetic"].values()) == len(plan.sheets["synthetic"])
    assert runs.table1_metrics(plan)
    w = SimpleNamespace(dataset="synthetic")
    assert params.feature_index(plan, w.dataset).startswith("results/synthetic/features/")


def test_a_weights_file_is_a_job_input_and_none_or_imagenet_is_not():
    assert params.weights_files({"weights": "results/pretrain/resnet18/encoder.pt"}) == [
        "results/pretrain/resnet18/encoder.pt"
    ]
    assert params.weights_files('{"weights": "/models/uni.bin", "k": 8}') == ["/models/uni.bin"]
    for value in ("none", "imagenet", None):
        assert params.weights_files({"weights": value}) == []
    assert params.weights_files({"epochs": 3}) == []
