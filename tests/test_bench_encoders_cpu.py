"""The CPU encoder benchmark (results/bench/encoders_cpu.csv): its table on tiny entries, its default list."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slidetrain.bench import encoders_cpu
from slidetrain.errors import SlidetrainError
from slidetrain.models.encoders import ENCODER_NAMES, build_encoder, encoder_dim
from slidetrain.models.foundation import FOUNDATION_NAMES, count_parameters

REPO = Path(__file__).resolve().parents[1]
TINY = ["resnet18", "vit_tiny_test"]


def test_table_of_tiny_encoders(tmp_path):
    out = tmp_path / "encoders_cpu.csv"
    encoders_cpu.bench_encoders_cpu(TINY, str(out), batch=2, repeats=1, threads=1)
    table = pd.read_csv(out)
    assert list(table.columns) == list(encoders_cpu.COLUMNS)
    assert list(table["model"]) == TINY
    assert (table[["batch", "tile_px", "threads"]].values == [2, 224, 1]).all()
    # vit_tiny_test's transform resizes the 224-px tiles to its 32-px input; a ResNet takes them as they are
    assert list(table["input_px"]) == [224, 32]
    for row in table.itertuples():
        assert math.isfinite(row.tiles_per_s) and row.tiles_per_s > 0, row.model
        encoder = build_encoder(row.model)  # the same seeded random init the child built
        assert row.params == count_parameters(encoder), row.model
        assert row.params_m == round(row.params / 1e6, 2)
        assert row.dim == encoder_dim(row.model)
        # memory, checked against something the benchmark does not measure: the process held the fp32
        # weights, so its peak RSS exceeds their bytes (ru_maxrss: the import peak can hide a small model)
        weight_bytes = 4 * row.params
        assert row.peak_rss_gb * 1e9 > weight_bytes, row.model
        assert isinstance(row.cpu, str) and row.cpu


def test_default_list_is_every_published_encoder_and_the_config_names_it():
    models = encoders_cpu.default_models()
    assert models[: len(ENCODER_NAMES)] == list(ENCODER_NAMES)
    assert set(models) == set(ENCODER_NAMES) | set(FOUNDATION_NAMES) - {"vit_tiny_test"}
    assert {"hoptimus0", "hoptimus1", "gigapath"} <= set(models)  # the ViT-g entries are timed too
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["bench"]["encoders_cpu"]["models"] == models, "a registered encoder is missing from the config"


def test_a_model_that_does_not_fit_in_free_memory_stops_before_building(monkeypatch):
    gigapath = 1_134_953_984
    monkeypatch.setattr(encoders_cpu, "_available_bytes", lambda: 5e9)  # 4.5 GB of weights alone
    with pytest.raises(SlidetrainError, match=r"gigapath \(1135M parameters\) needs about 6\.4 GB"):
        encoders_cpu._check_memory("gigapath", gigapath)
    monkeypatch.setattr(encoders_cpu, "_available_bytes", lambda: 7e9)
    encoders_cpu._check_memory("gigapath", gigapath)
