"""Campanella et al.'s outputs: tile-bag Table 1 rows and paper values, Figures 4 and 1, max tiles, derived splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from slidetrain.bench.max_tiles import search_max
from slidetrain.errors import ConfigError, SheetError
from slidetrain.paper.tilebag_tables import (
    TILEBAG_TABLE1_COLUMNS,
    bootstrap_band,
    tilebag_figure1,
    tilebag_figure4,
    tilebag_table1,
)


def write_run(root, method, split, auroc, losses=None):
    d = root / "results" / "synthetic_binary" / "runs" / method / split / "0"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"n_slides": 10, "metrics": {"auroc": auroc}}))
    if losses is not None:
        pd.DataFrame(
            {
                "epoch": range(1, len(losses) + 1),
                "train_loss": losses,
                "val_auroc": np.linspace(0.5, auroc, len(losses)),
            }
        ).to_csv(d / "history.csv", index=False)
    return d


def test_tilebag_table1_rows_and_paper_values(tmp_path):
    runs = [
        write_run(tmp_path, m, s, a)
        for m, s, a in [
            ("tilebag_k2", "mccv0", 0.70),
            ("tilebag_k2", "mccv1", 0.80),
            ("tilebag_k16", "mccv0", 0.9),
            ("tilebag_k16", "mccv1", 0.95),
            ("gma", "mccv0", 0.6),
            ("gma", "mccv1", 0.7),
            ("maxpool", "mccv0", 0.5),
        ]
    ]
    out = tilebag_table1(
        [r / "metrics.json" for r in runs], tmp_path / "t.csv", paper_k={2: 50, 16: 700}, markdown=tmp_path / "t.md"
    )
    assert list(out.columns) == TILEBAG_TABLE1_COLUMNS
    assert out.algorithm.tolist() == ["GMA", "Max-pool MIL", "Proposed", "Proposed"]
    k2 = out[out.k == 2].iloc[0]
    assert (k2.strategy, k2.auc_mean, k2.n_splits) == ("single", 75.0, 2)
    assert k2.auc_std == pytest.approx(round(100 * np.std([0.7, 0.8], ddof=1), 1))
    assert (k2.paper_auc_mean, k2.paper_auc_std) == (74.4, 2.9)  # the paper's K=50 single row
    assert out[out.k == 16].iloc[0].paper_auc_mean == 77.5  # K=700 single
    gma = out[out.algorithm == "GMA"].iloc[0]
    assert (gma.paper_auc_mean, gma.strategy) == (64.9, "")  # ImageNet ResNet50 embedding row
    maxpool = out[out.algorithm == "Max-pool MIL"].iloc[0]
    # the paper's embedding for this row is the string "NA", which pandas' default reading made NaN (no match)
    assert (maxpool.paper_auc_mean, maxpool.paper_auc_std) == (68.0, 2.6)
    assert np.isnan(out[out.algorithm == "Max-pool MIL"].iloc[0].auc_std)  # one split: no std
    assert pd.read_csv(tmp_path / "t.csv").shape == out.shape


def test_tilebag_table1_shows_a_run_left_out_with_its_reason(tmp_path):
    runs = [write_run(tmp_path, "tilebag_k16", s, 0.9) for s in ("mccv0", "mccv1")]
    reason = "bf16 autocast (amp) is emulated on this CPU: no AVX512-BF16 or AMX"
    out = tilebag_table1(
        [r / "metrics.json" for r in runs], tmp_path / "t.csv", paper_k={16: 700}, not_run={"tilebag_half_k16": reason}
    )
    half = out[out.strategy == "half"].iloc[0]
    assert (half.algorithm, half.k, half.n_splits, half.note) == ("Proposed", 16, 0, f"not run: {reason}")
    assert np.isnan(half.auc_mean) and np.isnan(half.auc_std)
    assert not np.isnan(half.paper_auc_mean)  # the paper's parallel-half row at K=700 still sits beside
    assert out[out.strategy == "single"].iloc[0].note == ""
    assert "not run: bf16 autocast" in (tmp_path / "t.csv").read_text()
    with pytest.raises(ConfigError, match="listed as not run but its metrics are given"):
        tilebag_table1([r / "metrics.json" for r in runs], tmp_path / "t2.csv", not_run={"tilebag_k16": reason})


def test_tilebag_table1_rejects_unknown_runs(tmp_path):
    run = write_run(tmp_path, "abmil", "mccv0", 0.6)
    with pytest.raises(ConfigError, match="abmil"):
        tilebag_table1([run / "metrics.json"], tmp_path / "t.csv")


def test_bootstrap_band_brackets_the_mean():
    curves = np.array([[1.0, 0.8, 0.6], [1.2, 0.9, 0.5], [0.8, 0.7, 0.7]])
    lo, hi = bootstrap_band(curves)
    assert (lo <= curves.mean(0)).all() and (hi >= curves.mean(0)).all() and (hi > lo).all()


def series_points(data: pd.DataFrame, panel: str) -> dict[str, int]:
    """Number of plotted points per series of one panel of a figure's data CSV."""
    return data[data.panel == panel].groupby("series").size().to_dict()


def test_tilebag_figure4_and_figure1_write_the_data_they_plot(tmp_path):
    runs = [
        write_run(tmp_path, f"tilebag_k{k}", s, 0.6 + 0.01 * k, [0.7, 0.6 - 0.01 * k, 0.5])
        for k in (2, 4)
        for s in ("mccv0", "mccv1")
    ]
    tilebag_figure4([r / "history.csv" for r in runs], tmp_path / "f4.png")
    assert (tmp_path / "f4.png").stat().st_size > 10_000
    f4 = pd.read_csv(tmp_path / "f4.csv")  # beside the PNG
    assert series_points(f4, "a") == {"K=2": 3, "K=4": 3}  # 3 epochs per K
    assert series_points(f4, "b") == {"mean": 2, "run": 4} == series_points(f4, "c")  # 2 K x 2 splits
    assert series_points(f4, "d") == {"single": 2}  # only `single` ran: its 2 splits at the largest K
    assert np.isfinite(f4.y).all()
    a2 = f4[(f4.panel == "a") & (f4.series == "K=2")].sort_values("x")
    assert a2.y.tolist() == pytest.approx([0.7, 0.58, 0.5])  # the mean loss over splits per epoch
    assert (a2.y_low <= a2.y).all() and (a2.y <= a2.y_high).all()
    b = f4[(f4.panel == "b") & (f4.series == "mean")].set_index("x").y
    assert b.to_dict() == pytest.approx({2: 0.5, 4: 0.5})  # final training loss
    parts = []
    for enc in ("resnet50", "vit_b_16"):
        p = tmp_path / f"{enc}.csv"
        pd.DataFrame(
            {
                "encoder": enc,
                "precision": ["fp32", "amp"],
                "tile_px": 224,
                "max_tiles": [10, 20],
                "device": "cpu",
                "memory_budget_gb": 2.0,
            }
        ).to_csv(p, index=False)
        parts.append(p)
    merged = tilebag_figure1(parts, tmp_path / "m.csv", tmp_path / "f1.png")
    assert len(merged) == 4 and (tmp_path / "f1.png").stat().st_size > 10_000
    f1 = pd.read_csv(tmp_path / "f1.csv")
    assert series_points(f1, "a") == {"here": 4}
    assert series_points(f1, "b") == {"here": 4, "paper": 4}  # both encoders are in the paper's Fig. 1
    assert np.isfinite(f1.y).all() and (f1.y > 0).all()
    here = f1[(f1.panel == "b") & (f1.series == "here")].set_index("x").y
    assert here["resnet50 amp"] == pytest.approx(20 / 2.0)  # max tiles per GB of the 2 GB budget
    paper = f1[(f1.panel == "b") & (f1.series == "paper")].set_index("x").y
    assert paper["resnet50 amp"] > paper["resnet50 fp32"]  # AMP fits more tiles, as the paper found


@pytest.mark.parametrize("true_max", [0, 1, 5, 16, 17, 1000])
def test_max_tiles_search_finds_the_largest_fit(true_max):
    probes = []

    def fit(n):
        probes.append(n)
        return n <= true_max

    assert search_max(fit, start=1, limit=4096) == true_max
    assert len(probes) <= 2 * int(np.log2(max(true_max, 1))) + 3  # doubling, then bisection


def test_max_tiles_search_stops_at_the_limit():
    assert search_max(lambda n: True, start=1, limit=100) == 100
    assert search_max(lambda n: n <= 70, start=1, limit=100) == 70


def test_max_tiles_probe_takes_a_foundation_model_by_its_registry_name(tmp_path):
    """Campanella et al.'s Figure 1 has ViTs: the probe builds a registry ViT (the tiny test entry here) at
    random init through timm, trains it one step, and its row joins Figure 1 without a paper value."""
    from slidetrain.bench.max_tiles import build_probe_encoder, forward_backward, max_tiles_table
    from slidetrain.models.foundation import FoundationEncoder

    enc = build_probe_encoder("vit_tiny_test", 32)
    assert isinstance(enc, FoundationEncoder) and enc.spec.arch.startswith("vit_")
    forward_backward("vit_tiny_test", "amp", 3, 32)  # bf16 autocast on the CPU runs through timm's ViT
    with pytest.raises(ConfigError, match="uni2_h"):  # the error lists the registry's names
        build_probe_encoder("vit_huge_nonexistent", 224)

    # one fresh process per probe (peak RSS): start = limit keeps it to one probe per precision
    out = tmp_path / "vit_tiny_test.csv"
    table = max_tiles_table(["vit_tiny_test"], ["fp32", "amp"], 32, "cpu", 4.0, out, start=4, limit=4)
    assert table.max_tiles.tolist() == [4, 4] and table.encoder.tolist() == ["vit_tiny_test"] * 2
    probes = pd.read_csv(tmp_path / "vit_tiny_test_probes.csv")
    assert probes.fits.all() and (probes.peak_gib > 0).all()
    tilebag_figure1([out], tmp_path / "m.csv", tmp_path / "f1.png")
    f1 = pd.read_csv(tmp_path / "f1.csv")
    assert series_points(f1, "b") == {"here": 2}  # the paper measured no such encoder: no paper bar


def test_max_tiles_rule_and_schema_accept_every_probe_encoder():
    from pathlib import Path

    import yaml

    from slidetrain.bench.max_tiles import ENCODERS
    from slidetrain.models.foundation import FOUNDATION_NAMES
    from slidetrain.workflow.tilebag_params import MAX_TILES_ENCODERS

    assert set(MAX_TILES_ENCODERS) == {*ENCODERS, *FOUNDATION_NAMES}
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml").read_text())
    probe = schema["properties"]["tilebag"]["properties"]["max_tiles"]["properties"]["encoders"]
    assert probe["items"]["enum"] == list(MAX_TILES_ENCODERS)


def test_derived_split_relabels_and_stratifies(tmp_path):
    from slidetrain.cli import main

    sheet = tmp_path / "s.tsv"
    labels = ["normal", "low_grade", "high_grade"] * 10
    pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(30)],
            "patient_id": [f"p{i}" for i in range(30)],
            "label": labels,
            "source": "synthetic",
        }
    ).to_csv(sheet, sep="\t", index=False)
    label_map = {"normal": "negative", "low_grade": "positive", "high_grade": "positive"}
    out = tmp_path / "split.csv"
    assert (
        main(
            [
                "split",
                "--sheet",
                str(sheet),
                "--classes",
                "normal",
                "low_grade",
                "high_grade",
                "--label-map",
                json.dumps(label_map),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    split = pd.read_csv(out)
    assert set(split.label) == {"negative", "positive"}
    assert (
        split.set_index("slide_id").label == pd.Series(labels, index=[f"s{i}" for i in range(30)]).map(label_map)
    ).all()
    for part in ("train", "val", "test"):
        assert set(split[split.part == part].label) == {"negative", "positive"}
    from slidetrain.data.sheet import relabel

    with pytest.raises(SheetError, match="high_grade"):
        relabel(pd.read_csv(sheet, sep="\t"), {"normal": "negative", "low_grade": "positive"})


def test_tilebag_table1_and_figure4_take_the_parallel_and_half_strategies(tmp_path):
    runs = [
        write_run(tmp_path, m, s, a, [0.7, 0.6, 0.5])
        for m, a in [
            ("tilebag_k2", 0.7),
            ("tilebag_k16", 0.9),
            ("tilebag_parallel_k16", 0.85),
            ("tilebag_half_k16", 0.8),
        ]
        for s in ("mccv0", "mccv1")
    ]
    out = tilebag_table1([r / "metrics.json" for r in runs], tmp_path / "t.csv", paper_k={2: 50, 16: 700})
    rows = {(r.k, r.strategy): r for r in out.itertuples()}
    assert rows[(16, "parallel")].auc_mean == 85.0 and rows[(16, "parallel")].paper_auc_mean == 76.9
    assert rows[(16, "half")].auc_mean == 80.0 and rows[(16, "half")].paper_auc_mean == 77.3  # parallel-half
    tilebag_figure4([r / "history.csv" for r in runs], tmp_path / "f4.png")
    f4 = pd.read_csv(tmp_path / "f4.csv")
    assert series_points(f4, "d") == {"single": 2, "parallel": 2, "half": 2}  # the three strategies at K=16
    assert set(f4[f4.panel == "d"].x) == {16} and np.isfinite(f4.y).all()
