"""Paper values join strictly: a configured paper name, K, strategy or column with no paper row stops the
table with an error naming it; the papers' own word "NA" is a value, not a missing cell."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slidetrain.cli import main
from slidetrain.errors import ConfigError
from slidetrain.paper.offload_tables import offload_table
from slidetrain.paper.reference import paper_row, paper_split_counts, paper_table
from slidetrain.paper.tables import table1, table4
from slidetrain.paper.tilebag_tables import tilebag_table1


def write_run(root, dataset, method, split="mccv0", auroc=0.8, accuracy=0.7):
    d = root / "results" / dataset / "runs" / method / split / "0"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"n_slides": 10, "metrics": {"accuracy": accuracy, "auroc": auroc}}))
    return d / "metrics.json"


def test_the_string_NA_is_read_as_a_value_and_only_empty_cells_are_missing():
    table = paper_table("tilebag_table1")
    assert "NA" in set(table.embedding)
    maxpool = paper_row(table, "tilebag_table1", "test", algorithm="Max-pool MIL", embedding="NA")
    assert (maxpool.auc_mean, maxpool.auc_std) == (68.0, 2.6)
    assert table.k.isna().sum() == 8 and table.k.dropna().min() == 50  # empty K cells of the frozen rows


def test_an_unknown_paper_table_is_named():
    with pytest.raises(ConfigError, match="'local_tabel1'.*local_table1"):
        paper_table("local_tabel1")


def test_table1_stops_on_a_paper_name_the_paper_lacks_and_names_it(tmp_path):
    paths = [write_run(tmp_path, "nsclc", "clam_mb")]
    with pytest.raises(ConfigError, match=r"datasets\.nsclc\.paper_name = 'TCGA-NSLC'.*TCGA-NSCLC"):
        table1(paths, tmp_path / "t.csv", tmp_path / "t.md", paper_names={"nsclc": "TCGA-NSLC"})
    assert not (tmp_path / "t.csv").exists()  # no table with a blank paper column


def test_table1_command_exits_with_the_message(tmp_path, capsys):
    paths = [write_run(tmp_path, "nsclc", "clam_mb")]
    code = main(
        [
            "table1",
            "--metrics",
            *map(str, paths),
            "--out-csv",
            str(tmp_path / "t.csv"),
            "--out-md",
            str(tmp_path / "t.md"),
            "--paper-names",
            "nsclc=TCGA-NSLC",
        ]
    )
    assert code not in (0, None)
    assert "TCGA-NSLC" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


def test_table1_a_paper_method_with_no_row_for_the_dataset_is_an_error(tmp_path):
    # MIL-RNN is binary-only in the paper: it has no TCGA-RCC row (the workflow marks it "/" instead of running it)
    paths = [write_run(tmp_path, "rcc", "milrnn")]
    with pytest.raises(ConfigError, match=r"milrnn.*'rcc'.*no row.*MIL-RNN.*TCGA-RCC"):
        table1(paths, tmp_path / "t.csv", tmp_path / "t.md", paper_names={"rcc": "TCGA-RCC"})


def test_table1_without_paper_name_or_paper_method_leaves_the_paper_columns_empty(tmp_path):
    paths = [write_run(tmp_path, "synthetic", "clam_mb"), write_run(tmp_path, "nsclc", "transmil")]
    out = table1(paths, tmp_path / "t.csv", tmp_path / "t.md", paper_names={"nsclc": "TCGA-NSCLC"})
    assert out.paper_accuracy.isna().all()  # synthetic has no paper name; the paper reports no TransMIL


def test_table4_stops_on_a_wrong_paper_name(tmp_path):
    paths = [write_run(tmp_path, "lks", "local_k4")]
    with pytest.raises(ConfigError, match=r"datasets\.lks\.paper_name = 'LKS2'"):
        table4(paths, tmp_path / "t.csv", tmp_path / "t.md", paper_names={"lks": "LKS2"})
    assert table4(paths, tmp_path / "t.csv", tmp_path / "t.md", paper_names={"lks": "LKS"}).paper_accuracy[0] == 0.8976


def test_tilebag_table1_a_paper_k_without_a_row_is_named(tmp_path):
    paths = [write_run(tmp_path, "syn", "tilebag_k2")]
    with pytest.raises(ConfigError, match=r"tilebag\.paper_k \(for K=2\) = 51"):
        tilebag_table1(paths, tmp_path / "t.csv", paper_k={2: 51})


def test_tilebag_table1_a_strategy_the_paper_did_not_run_at_that_k_is_named(tmp_path):
    # the paper ran `parallel` at K = 700, 2100 and 4900 only
    paths = [write_run(tmp_path, "syn", "tilebag_parallel_k2")]
    with pytest.raises(ConfigError, match=r"tilebag_parallel_k2.*paper K=50.*'parallel'.*no row"):
        tilebag_table1(paths, tmp_path / "t.csv", paper_k={2: 50})


def _offload_metrics(root, run, testset="external", tiles="all"):
    path = root / "results" / "syn" / "runs" / run / "mccv0" / "0" / f"test_{testset}_{tiles}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"qwk": 0.5}, "n_slides": 4}))
    return path


def test_offload_table_a_paper_column_the_paper_lacks_is_named(tmp_path):
    paths = [_offload_metrics(tmp_path, "biglayers_abmil_frozen_aug")]
    with pytest.raises(ConfigError, match=r"--paper external_all=tcga_prad: .*no column tcga_prad_qwk_mean"):
        offload_table(paths, "qwk", "offload_table1", {}, "s", {"external_all": "tcga_prad"}, tmp_path / "t.csv")


def test_offload_table_table2_without_unaugmented_rows_leaves_them_blank(tmp_path):
    paths = [
        _offload_metrics(tmp_path, "biglayers_abmil_frozen_noaug", "external", "sampled"),
        _offload_metrics(tmp_path, "biglayers_abmil_frozen_aug", "external", "sampled"),
    ]
    for p in paths:
        p.write_text(json.dumps({"metrics": {"accuracy": 0.8}, "n_slides": 4}))
    out = offload_table(paths, "acc", "offload_table2", {}, "s", {"external_sampled": "camelyon16"}, tmp_path / "t.csv")
    by_aug = out.set_index("augmentation").paper_acc_mean
    assert pd.isna(by_aug["no"]) and by_aug["yes"] == 81.35  # the paper trained with augmentation only


def test_split_counts_by_paper_name_and_an_unknown_one_named():
    train, val, test = paper_split_counts("LKS")
    assert test < train and val < train
    with pytest.raises(ConfigError, match="'TCGA-LUNG'"):
        paper_split_counts("TCGA-LUNG")


def test_the_gpu_script_takes_its_paper_numbers_from_the_csvs():
    from slidetrain.bench.gpu import paper_image_size, paper_tiles_per_gb

    sizes = {tuple(map(int, s.split("x"))) for s in paper_table("local_table2").image_size}
    assert paper_image_size() == min(sizes, key=lambda wh: wh[0] * wh[1])
    memory = paper_table("tilebag_memory").set_index(["encoder", "precision"]).max_tiles_h100_80gb
    assert paper_tiles_per_gb() == pytest.approx(
        {"fp32": memory["ResNet50", "fp32"] / 80, "amp": memory["ResNet50", "amp-fp16"] / 80}
    )
