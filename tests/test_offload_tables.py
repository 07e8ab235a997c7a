"""Big-Layers Tables 1/2 from run metrics; the external cohort's split and synthesis settings."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest

from slidetrain.cli import main
from slidetrain.errors import ConfigError
from slidetrain.paper.offload_tables import offload_table


def _metrics(root, dataset, run, testset, tiles, value, key="qwk", seed=0):
    path = root / "results" / dataset / "runs" / run / "mccv0" / str(seed) / f"test_{testset}_{tiles}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # `metrics` is computed on the mean over repeats; the table uses the per-repeat mean (the paper's)
    path.write_text(
        json.dumps({"metrics": {key: 0.0}, "n_slides": 10, "repeats": {"n": 1, "metrics_mean": {key: value}}})
    )
    return path


def test_table1_rows_means_and_the_papers_values_where_the_test_set_matches(tmp_path):
    paths = [
        _metrics(tmp_path, "synthetic", "biglayers_dtfd_trained_aug", "internal", "all", 0.80, seed=0),
        _metrics(tmp_path, "synthetic", "biglayers_dtfd_trained_aug", "internal", "all", 0.90, seed=1),
        _metrics(tmp_path, "synthetic", "biglayers_dtfd_trained_aug", "internal", "sampled", 0.70),
        _metrics(tmp_path, "synthetic", "biglayers_dtfd_trained_aug", "external", "all", 0.60),
        _metrics(tmp_path, "synthetic", "biglayers_abmil_frozen_noaug", "external", "sampled", 0.50),
    ]
    out = tmp_path / "t1.csv"
    table = offload_table(
        paths,
        "qwk",
        "offload_table1",
        {"internal": "synthetic", "external": "ext"},
        "10x8",
        {"internal_all": "panda", "external_all": "tcga_prad_all", "external_sampled": "tcga_prad_256"},
        out,
    )
    assert list(table.columns[:10]) == [
        "aggregator",
        "augmentation",
        "encoder",
        "dataset",
        "test_tiles",
        "qwk_mean",
        "qwk_std",
        "n_runs",
        "paper_qwk_mean",
        "paper_qwk_std",
    ]
    rows = {(r.aggregator, r.encoder, r.dataset, r.test_tiles): r for r in table.itertuples()}
    both = rows[("DTFD", "trained", "synthetic", "all")]
    assert (both.qwk_mean, both.n_runs) == (85.0, 2) and both.qwk_std == pytest.approx(7.07, abs=0.01)
    assert (both.paper_qwk_mean, both.paper_qwk_std, both.paper_dataset) == (86.59, 0.40, "PANDA")
    # sampled internal tiles: the paper has no such column
    assert math.isnan(rows[("DTFD", "trained", "synthetic", "10x8")].paper_qwk_mean)
    assert rows[("DTFD", "trained", "ext", "all")].paper_qwk_mean == 69.47  # TCGA-PRAD all tiles, augmented
    frozen = rows[("ABMIL", "frozen", "ext", "10x8")]
    assert (frozen.augmentation, frozen.qwk_mean, frozen.paper_qwk_mean) == ("no", 50.0, 47.31)
    assert pd.read_csv(out).shape == (4, 11)
    # internal rows first, then external
    assert list(table.dataset) == ["synthetic", "synthetic", "ext", "ext"]


def test_table2_through_the_command_line(tmp_path):
    paths = [
        _metrics(
            tmp_path, "synthetic_binary", "biglayers_transmil_trained_aug", "external", "sampled", 0.75, key="accuracy"
        )
    ]
    out = tmp_path / "t2.csv"
    assert main(
        [
            "offload-table",
            "--metrics",
            *map(str, paths),
            "--metric",
            "acc",
            "--paper-table",
            "offload_table2",
            "--test-datasets",
            "external=ext_bin",
            "--sampled-label",
            "3x16",
            "--paper",
            "external_sampled=camelyon16",
            "--out",
            str(out),
        ]
    ) in (0, None)
    row = pd.read_csv(out).iloc[0]
    assert (row.acc_mean, row.test_tiles, row.paper_acc_mean, row.paper_dataset) == (75.0, "3x16", 83.33, "CAMELYON16")


def test_a_path_of_another_layout_is_named(tmp_path):
    bad = tmp_path / "results" / "synthetic" / "runs" / "abmil" / "mccv0" / "0" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="abmil/mccv0/0/metrics.json"):
        offload_table([bad], "qwk", "offload_table1", {}, "s", {}, tmp_path / "o.csv")


def test_external_split_of_a_derived_view_maps_labels(tmp_path):
    sheet = tmp_path / "ext.tsv"
    pd.DataFrame(
        {
            "slide_id": ["e0", "e1", "e2"],
            "patient_id": ["p0", "p1", "p1"],
            "label": ["normal", "low_grade", "high_grade"],
            "source": "synthetic",
        }
    ).to_csv(sheet, sep="\t", index=False)
    out = tmp_path / "external.csv"
    main(
        [
            "external-split",
            "--sheet",
            str(sheet),
            "--classes",
            "normal",
            "low_grade",
            "high_grade",
            "--label-map",
            json.dumps({"normal": "negative", "low_grade": "positive", "high_grade": "positive"}),
            "--out",
            str(out),
        ]
    )
    split = pd.read_csv(out)
    assert split.part.unique().tolist() == ["test"]
    assert dict(zip(split.slide_id, split.label, strict=True)) == {"e0": "negative", "e1": "positive", "e2": "positive"}


def test_stain_scale_shifts_the_stain_and_nothing_else():
    from dataclasses import asdict

    from slidetrain.wsi.synthetic import synthetic_spec

    base = synthetic_spec("ext_0001", "low_grade", seed=1, size_range_px=(5000, 8000))
    shifted = synthetic_spec("ext_0001", "low_grade", seed=1, size_range_px=(5000, 8000), stain_scale=(1.25, 0.8))
    assert shifted.stain_h == pytest.approx(1.25 * base.stain_h) and shifted.stain_e == pytest.approx(
        0.8 * base.stain_e
    )
    same = {k: v for k, v in asdict(base).items() if k not in ("stain_h", "stain_e")}
    assert same == {k: v for k, v in asdict(shifted).items() if k not in ("stain_h", "stain_e")}
    assert 5000 <= max(base.width_px, base.height_px) <= 8000
    with pytest.raises(ConfigError, match="stain_scale"):
        synthetic_spec("x", "normal", seed=1, stain_scale=(0.0, 1.0))


def test_a_users_config_keeps_its_own_offload_tables_and_drops_the_defaults_orphans():
    from slidetrain.workflow_config import replace_named_blocks

    default = {
        "datasets": {"synthetic": {}, "synthetic_external": {}},
        "derived_datasets": {"synthetic_binary": {"from": "synthetic"}},
        "offload_tables": {
            "params": {"k": 8, "lr": 1e-3},
            "aggregator_params": {"transmil": {"landmarks": 32}},
            "tables": {
                "offload_table1": {"dataset": "synthetic", "external": "synthetic_external"},
                "offload_table2": {"dataset": "synthetic_binary", "external": "synthetic_external"},
            },
        },
    }
    mine = {
        "datasets": {"panda": {}},
        "offload_tables": {
            "params": {"lr": 1e-4},
            "aggregator_params": {},
            "tables": {"offload_table1": {"dataset": "panda", "external": "panda"}},
        },
    }
    merged = copy.deepcopy(default)
    merged["offload_tables"]["params"].update(mine["offload_tables"]["params"])  # Snakemake's deep merge
    out = replace_named_blocks(merged, mine)
    assert out["offload_tables"] == mine["offload_tables"]  # the default's k 8 and landmarks 32 do not leak
    # a config copied from the default with its own datasets: tables on missing datasets are left out
    kept = replace_named_blocks(
        copy.deepcopy(default),
        {
            "datasets": {"synthetic": {}, "synthetic_external": {}},
            "derived_datasets": {"synthetic_binary": {"from": "synthetic"}},
        },
    )
    assert kept["offload_tables"]["tables"] == default["offload_tables"]["tables"]
    no_external = replace_named_blocks(
        copy.deepcopy(default),
        {"datasets": {"synthetic": {}}, "derived_datasets": {"synthetic_binary": {"from": "synthetic"}}},
    )
    assert no_external["offload_tables"]["tables"] == {}
    gone = replace_named_blocks(copy.deepcopy(default), {"datasets": {"mine": {}}})
    assert gone["offload_tables"]["tables"] == {}
    # a copy of config.yaml (its own offload_tables block) with one real dataset: nothing left to build
    copy_of_default = {"datasets": {"mine": {}}, "offload_tables": copy.deepcopy(default["offload_tables"])}
    assert replace_named_blocks(copy.deepcopy(default), copy_of_default)["offload_tables"]["tables"] == {}


def test_an_external_split_reads_only_where_allowed(tmp_path):
    from slidetrain.data.splits import read_split
    from slidetrain.errors import SplitError

    path = tmp_path / "external.csv"
    pd.DataFrame(
        {"slide_id": ["e0", "e1"], "patient_id": ["p0", "p1"], "label": ["a", "b"], "part": ["test", "test"]}
    ).to_csv(path, index=False)
    assert read_split(path, allow_external=True).part.tolist() == ["test", "test"]
    with pytest.raises(SplitError, match="empty"):
        read_split(path)  # training needs train and val
    pd.DataFrame(
        {"slide_id": ["e0", "e0"], "patient_id": ["p0", "p0"], "label": ["a", "a"], "part": ["test", "test"]}
    ).to_csv(path, index=False)
    with pytest.raises(SplitError, match="duplicate"):
        read_split(path, allow_external=True)
