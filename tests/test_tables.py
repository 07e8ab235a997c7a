"""Table 1: aggregation over runs and the paper's values joined beside ours."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slidetrain.paper.tables import PAPER_METHOD_NAMES, paper_table, table1


def write_run(root, dataset, method, split, seed, acc, auroc):
    d = root / "results" / dataset / "runs" / method / split / str(seed)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"n_slides": 10, "metrics": {"accuracy": acc, "auroc": auroc}}))
    return d / "metrics.json"


def test_table1_means_stds_and_paper_values(tmp_path):
    paths = [
        write_run(tmp_path, "nsclc", "clam_mb", "mccv0", 0, 0.8, 0.9),
        write_run(tmp_path, "nsclc", "clam_mb", "mccv1", 0, 0.9, 0.95),
        write_run(tmp_path, "nsclc", "transmil", "mccv0", 0, 0.7, 0.8),
    ]
    out = table1(
        paths,
        tmp_path / "t.csv",
        tmp_path / "t.md",
        paper_names={"nsclc": "TCGA-NSCLC"},
        not_applicable=[("milrnn", "rcc")],
        method_order=["clam_mb", "transmil", "milrnn"],
    )
    clam = out[out.method == "clam_mb"].iloc[0]
    assert clam.accuracy == pytest.approx(0.85) and clam.n_seeds == 2
    assert clam.accuracy_std == pytest.approx(pd.Series([0.8, 0.9]).std())
    assert (clam.paper_accuracy, clam.paper_auroc) == (0.8598, 0.9131)  # the paper's CLAM-MB on TCGA-NSCLC
    transmil = out[out.method == "transmil"].iloc[0]
    assert pd.isna(transmil.paper_accuracy)  # the local-learning paper reports no TransMIL row
    assert (out[out.method == "milrnn"].iloc[0, 2:] == "/").all()
    assert (tmp_path / "t.md").read_text().count("\n") == 2 + len(out)


def test_every_paper_method_name_exists_in_the_paper_table():
    names = set(paper_table("local_table1").method)
    assert set(PAPER_METHOD_NAMES.values()) <= names
