"""Local-learning paper benchmarks: Table 2 (training memory) and Table 3 (inference speed).

Behaviour only (ratios, joins, stage bookkeeping, a real tiny measurement);
the measured numbers themselves are workflow outputs, never asserted here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from slidetrain.bench.inference_speed import STAGES, TABLE3_COLUMNS
from slidetrain.bench.local_memory import TABLE2_COLUMNS, parse_size, table2
from slidetrain.cli import main
from slidetrain.errors import ConfigError
from slidetrain.models.local import LocalBackbone, entries_from_resnet, stem_bands
from slidetrain.wsi.image import extract_slide_image
from slidetrain.wsi.mask import segment_tissue
from slidetrain.wsi.slide import open_slide

GIB = 2**30


def write_measurement(path, method, size, gib, device="cpu"):
    record = {
        "method": method,
        "image_size": size,
        "device": device,
        "probe_method": "test",
        "peak_bytes": int((gib + 0.5) * GIB),
        "baseline_bytes": int(0.5 * GIB),
        "increment_bytes": int(gib * GIB),
        "wall_s": 1.0,
    }
    path.write_text(json.dumps(record))
    return path


# --------------------------------------------------------------------------- Table 2


def test_parse_size_is_width_by_height():
    assert parse_size("8698x7496") == (8698, 7496)
    assert parse_size(" 640 X 480 ") == (640, 480)
    for bad in ("8698", "0x10", "axb", "10x10x3"):
        with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_table2_ratios_and_paper_join(tmp_path):
    files = [
        write_measurement(tmp_path / "a.json", "local_k4", "8698x7496", 4.0),
        write_measurement(tmp_path / "b.json", "image_e2e", "8698x7496", 16.0),
        write_measurement(tmp_path / "c.json", "local_k8", "8698x7496", 3.0),
        write_measurement(tmp_path / "d.json", "image_e2e", "1000x800", 2.0),
        write_measurement(tmp_path / "e.json", "local_k4", "1000x800", 1.0),
        write_measurement(tmp_path / "f.json", "local_k8", "2000x1000", 1.0),  # no image_e2e at this size
        write_measurement(tmp_path / "g.json", "image_e2e", "1000x800", 3.0, device="cuda"),
    ]
    t = table2(files)
    assert list(t.columns) == TABLE2_COLUMNS
    row = {(r.image_size, r.method, r.device): r for r in t.itertuples()}
    assert row["8698x7496", "image_e2e", "cpu"].ratio_to_image_e2e == pytest.approx(1.0)
    assert row["8698x7496", "local_k4", "cpu"].ratio_to_image_e2e == pytest.approx(0.25)
    assert row["8698x7496", "local_k8", "cpu"].ratio_to_image_e2e == pytest.approx(3 / 16)
    assert row["1000x800", "local_k4", "cpu"].ratio_to_image_e2e == pytest.approx(0.5)  # not the cuda e2e
    assert math.isnan(row["2000x1000", "local_k8", "cpu"].ratio_to_image_e2e)
    assert row["8698x7496", "local_k4", "cpu"].peak_memory_gb == pytest.approx(4.0)
    # the paper's numbers where the size is one of its sizes, NaN elsewhere
    assert row["8698x7496", "image_e2e", "cpu"].paper_memory_gb == pytest.approx(17.89)
    assert row["8698x7496", "local_k4", "cpu"].paper_memory_gb == pytest.approx(5.35)
    assert row["8698x7496", "local_k8", "cpu"].paper_memory_gb == pytest.approx(3.71)
    assert math.isnan(row["1000x800", "image_e2e", "cpu"].paper_memory_gb)
    # smallest image first; image_e2e, local_k4, local_k8 within a size
    assert list(t.image_size[:3]) == ["1000x800"] * 3
    assert list(t[t.image_size == "8698x7496"].method) == ["image_e2e", "local_k4", "local_k8"]

    csv, md = tmp_path / "table2.csv", tmp_path / "table2.md"
    assert main(["table2", "--measurements", *map(str, files), "--out", str(csv), "--markdown", str(md)]) == 0
    assert list(pd.read_csv(csv).columns) == TABLE2_COLUMNS
    assert md.read_text().startswith("| image_size | method |")

    write_measurement(tmp_path / "dup.json", "image_e2e", "1000x800", 2.5)
    with pytest.raises(ConfigError, match="more than one measurement"):
        table2([*files, tmp_path / "dup.json"])


def as_variant(path, variant, **extra):
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "variant": variant, **extra}))
    return path


def test_table2_divides_each_variant_by_image_e2e_under_the_same_variant(tmp_path):
    files = [
        write_measurement(tmp_path / "a.json", "image_e2e", "8698x7496", 16.0),
        write_measurement(tmp_path / "b.json", "local_k4", "8698x7496", 4.0),
        as_variant(
            write_measurement(tmp_path / "c.json", "local_k4", "8698x7496", 2.0), "checkpoint_tiles", wall_s=3.5
        ),
        as_variant(write_measurement(tmp_path / "d.json", "image_e2e", "8698x7496", 8.0), "checkpoint_tiles"),
        as_variant(write_measurement(tmp_path / "e.json", "local_k8", "8698x7496", 1.0), "checkpoint_blocks"),
    ]
    t = table2(files)
    row = {(r.method, r.variant): r for r in t.itertuples()}
    ck = row["local_k4", "checkpoint_tiles"]
    assert ck.ratio_to_image_e2e == pytest.approx(2 / 8)  # checkpointed E2E, not plain E2E's 16
    assert ck.ratio_denominator == "image_e2e.checkpoint_tiles"
    assert ck.variant_ratio_to_plain_image_e2e == pytest.approx(2 / 16)  # the mixed figure, named so
    assert ck.seconds_per_slide == pytest.approx(3.5)
    assert math.isnan(ck.paper_memory_gb) and math.isnan(ck.paper_ratio_to_image_e2e)
    assert row["image_e2e", "checkpoint_tiles"].ratio_to_image_e2e == pytest.approx(1.0)
    # no checkpointed E2E under checkpoint_blocks: no like-for-like ratio rather than a mixed one
    assert math.isnan(row["local_k8", "checkpoint_blocks"].ratio_to_image_e2e)
    plain = row["local_k4", ""]
    assert plain.ratio_to_image_e2e == pytest.approx(4 / 16) and plain.ratio_denominator == "image_e2e"
    assert math.isnan(plain.variant_ratio_to_plain_image_e2e)
    assert plain.paper_memory_gb == pytest.approx(5.35)
    assert plain.paper_ratio_to_image_e2e == pytest.approx(5.35 / 17.89)
    # the paper's profile (no variant) heads the table, the variants follow
    assert list(t.variant) == ["", "", "checkpoint_blocks", "checkpoint_tiles", "checkpoint_tiles"]


def test_tiny_real_table2_denominator_has_the_rows_variant(tmp_path):
    """Real measurements at a tiny size: every ratio's denominator is image_e2e under the row's variant.

    A plain image_e2e row with a far larger (made-up) increment sits beside them, so dividing a
    checkpointed row by plain E2E would give a visibly different ratio.
    """
    variant = '{"checkpointing": "blocks"}'
    files = []
    for method in ("image_e2e", "local_k4"):
        out = tmp_path / f"{method}.checkpoint_blocks.json"
        args = [
            "bench-train-memory",
            "--method",
            method,
            "--size",
            "96x64",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--params",
            variant,
            "--variant",
            "checkpoint_blocks",
            "--out",
            str(out),
        ]
        assert main(args) == 0
        files.append(out)
    files.append(write_measurement(tmp_path / "plain_e2e.json", "image_e2e", "96x64", 64.0))
    t = table2(files).set_index(["method", "variant"], drop=False)
    measured = {(r.method, r.variant): r.peak_memory_gb for r in t.itertuples()}
    for r in t.itertuples():
        denominator = t.loc[tuple(r.ratio_denominator.partition(".")[::2])]
        assert denominator.method == "image_e2e" and denominator.variant == r.variant
        assert r.ratio_to_image_e2e == pytest.approx(measured[r.method, r.variant] / denominator.peak_memory_gb)
    ck = t.loc["local_k4", "checkpoint_blocks"]
    assert ck.ratio_to_image_e2e > 4 * ck.variant_ratio_to_plain_image_e2e  # 64 GiB decoy is not used


def test_a_tiny_real_measurement_writes_a_sane_json(tmp_path):
    out = tmp_path / "m.json"
    args = "bench-train-memory --method local_k4 --size 128x96 --device cpu --threads 1 --out"
    assert main([*args.split(), str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m["method"], m["image_size"], m["width"], m["height"], m["device"]) == (
        "local_k4",
        "128x96",
        128,
        96,
        "cpu",
    )
    assert m["probe_method"].startswith("cpu_peak_rss_spawn")
    assert m["peak_bytes"] == m["baseline_bytes"] + m["increment_bytes"]
    # built inside the call: parameters + gradients + AdamW's two moments are in the increment
    from slidetrain.train.wholeimage.registry import build_learner

    n_params = sum(p.numel() for p in build_learner("local_k4", 2).net.parameters())
    assert m["increment_bytes"] >= 0.9 * 4 * 4 * n_params
    assert m["increment_bytes"] < 4 * 2**30
    assert m["wall_s"] > 0


# --------------------------------------------------------------------------- learner memory


@pytest.mark.parametrize("size", [(97, 250), (431, 383), (1201, 64)])
def test_banded_stem_equals_the_whole_stem(size):
    backbone = LocalBackbone(entries_from_resnet(torchvision.models.resnet34()), 4).train()
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        whole = backbone.entries[0](image)
        for rows in (1, 5, 32):
            assert torch.equal(stem_bands(backbone.entries[0], image, rows), whole)
    assert torch.equal(backbone.stem(image), whole)
    # a stem whose BatchNorm uses batch statistics cannot be split: it runs whole
    stem = backbone.entries[0]
    stem[1].train()
    try:
        assert torch.equal(stem_bands(stem, image, 1), stem(image))
    finally:
        stem[1].eval()


# --------------------------------------------------------------------------- Table 3


@pytest.fixture(scope="module")
def bench_slide(tmp_path_factory):
    import dataclasses

    from slidetrain.wsi.synthetic import synthetic_spec, write_synthetic_slide

    spec = synthetic_spec("bench_0", "high_grade", seed=3, size_range_px=(3000, 3000))
    spec = dataclasses.replace(spec, width_px=3600, height_px=3000)
    path = tmp_path_factory.mktemp("bench") / "bench_0.tiff"
    write_synthetic_slide(path, spec)
    return path


def test_bench_inference_rows_totals_and_gain(tmp_path, bench_slide):
    csv, md = tmp_path / "table3.csv", tmp_path / "table3.md"
    args = "--device cpu --threads 1 --warmup 0 --batch-size 8 --min-tissue-fraction 0.25"
    assert (
        main(
            [
                "bench-inference",
                "--slides",
                str(bench_slide),
                *args.split(),
                "--out",
                str(csv),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    t = pd.read_csv(csv)
    assert list(t.columns) == TABLE3_COLUMNS
    assert set(t.device) == {"cpu"}
    (size,) = set(t.image_size)
    # the 5x tissue box that training sees (20x slide: at most a quarter of each side)
    with open_slide(bench_slide) as slide:
        _, meta = extract_slide_image(slide, segment_tissue(slide), 5.0)
    assert parse_size(size) == tuple(meta["size"])
    assert meta["size"][0] <= 3600 / 4 and meta["size"][1] <= 3000 / 4
    totals = {}
    for method, stages in STAGES.items():
        rows = t[t.method == method].set_index("stage")
        assert list(rows.index) == [*stages, "total"]
        assert (rows.seconds > 0).all()
        assert rows.seconds["total"] == pytest.approx(rows.seconds[list(stages)].sum(), abs=2e-4)
        assert rows.speed_gain[list(stages)].isna().all()
        totals[method] = rows.seconds["total"]
    gains = t[t.stage == "total"].speed_gain
    assert np.allclose(gains, totals["gabmil"] / totals["local_k4"], rtol=1e-3)
    assert md.read_text().count("| total |") == 2
