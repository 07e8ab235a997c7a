"""Benchmark tables read the steps' own outputs correctly (numbers themselves are never asserted)."""

from __future__ import annotations

import pandas as pd

from slidetrain.bench.mil_throughput import make_bench_bags, throughput_table
from slidetrain.data.splits import read_split
from slidetrain.wsi.features import read_features


def test_throughput_table_names_each_method(tmp_path):
    runs, benches = [], []
    for method, epoch_s in [("abmil", 3.0), ("dtfd", 7.0)]:
        run = tmp_path / "results" / "bench" / "mil" / method
        run.mkdir(parents=True)
        pd.DataFrame([{"epoch": 1, "seconds": epoch_s}]).to_csv(run / "history.csv", index=False)
        bench = tmp_path / f"{method}.tsv"
        pd.DataFrame([{"s": epoch_s + 2, "max_rss": 100.0}]).to_csv(bench, sep="\t", index=False)
        runs.append(run)
        benches.append(bench)
    table = throughput_table(runs, benches, tmp_path / "t.csv")
    assert table.method.tolist() == ["abmil", "dtfd"]
    assert table.epoch_s.tolist() == [3.0, 7.0] and table.job_s.tolist() == [5.0, 9.0]


def test_bench_bags_have_the_asked_shape(tmp_path):
    make_bench_bags(tmp_path / "bags", tmp_path / "split.csv", n_bags=6, n_instances=20, dim=8)
    split = read_split(tmp_path / "split.csv")
    assert len(split) == 6 and set(split.part) == {"train", "val", "test"}
    x, coords = read_features(tmp_path / "bags" / "bag_00000.h5")
    assert x.shape == (20, 8) and coords.shape == (20, 2)
