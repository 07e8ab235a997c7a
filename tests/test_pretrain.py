"""Self-supervised pretraining (slidetrain.train.pretrain): views, loss, resume, the saved encoder, the cohort."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidetrain.errors import ConfigError
from slidetrain.models.encoders import build_encoder
from slidetrain.train import common
from slidetrain.train.pretrain.probe import probe_scores
from slidetrain.train.pretrain.run import pretrain_config
from slidetrain.train.pretrain.simclr import PretrainConfig, nt_xent, pretrain
from slidetrain.train.pretrain.views import ViewSettings, two_views

ROOT = Path(__file__).resolve().parents[1]


def _tiles(n: int = 24, px: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


def _tiny(**kw) -> PretrainConfig:
    base = dict(arch="resnet18", steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)
    return PretrainConfig(**{**base, **kw, "views": ViewSettings(input_px=16)})


def test_views_are_seeded_and_differ_between_the_two():
    tiles = _tiles()
    a1, a2 = two_views(tiles, ViewSettings(input_px=16), torch.Generator().manual_seed(3))
    b1, b2 = two_views(tiles, ViewSettings(input_px=16), torch.Generator().manual_seed(3))
    assert a1.shape == (24, 3, 16, 16)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, a2)


def test_nt_xent_equals_its_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    loss, acc = nt_xent(z1, z2, temperature=0.5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    expected = 0.0
    for i in range(6):
        j = (i + 3) % 6
        others = [math.exp(float(z[i] @ z[k]) / 0.5) for k in range(6) if k != i]
        expected += -math.log(math.exp(float(z[i] @ z[j]) / 0.5) / sum(others))
    assert loss.item() == pytest.approx(expected / 6, rel=1e-5)
    # identical views: every view's nearest other view is its pair
    _, acc_same = nt_xent(z1, z1.clone(), temperature=0.5)
    assert acc_same.item() == 1.0


def test_pretrained_state_loads_as_weights_and_moves_the_encoder(tmp_path):
    state = pretrain(_tiles(), _tiny(), tmp_path)
    assert not any(k.startswith("fc.") for k in state)
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    x = torch.randn(2, 3, 32, 32)
    trained, random = build_encoder("resnet18", str(path)), build_encoder("resnet18", "none")
    assert torch.equal(trained.trunk[0].weight, state["conv1.weight"])
    assert not torch.allclose(trained(x), random(x))
    history = pd.read_csv(tmp_path / "history.csv")
    assert history.step.tolist() == [1, 2, 3, 4] and np.isfinite(history.loss).all()


class Killed(Exception):
    pass


def test_resume_after_a_kill_trains_what_an_uninterrupted_run_trains(tmp_path, monkeypatch):
    whole = pretrain(_tiles(), _tiny(), tmp_path / "whole")

    def stop(step: int) -> None:
        if step == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(common, "after_epoch_checkpoint", stop)
        with pytest.raises(Killed):
            pretrain(_tiles(), _tiny(), tmp_path / "resumed")
    assert len(pd.read_csv(tmp_path / "resumed" / "history.csv")) == 2
    resumed = pretrain(_tiles(), _tiny(), tmp_path / "resumed")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    # a checkpoint written under other settings is not resumed from
    other = pretrain(_tiles(), _tiny(lr=5e-4), tmp_path / "resumed")
    assert not all(torch.equal(whole[k], other[k]) for k in whole)


def test_config_keys_are_checked():
    cfg = pretrain_config("resnet34", {"steps": 3, "input_px": 24, "crop_scale": [0.5, 1.0]})
    assert cfg.steps == 3 and cfg.views.input_px == 24 and cfg.views.crop_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        pretrain_config("resnet34", {"stepz": 3})
    with pytest.raises(ConfigError, match="pretrain.archs"):
        pretrain_config("vit_b_16", {})


def test_probe_reads_a_separable_feature_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    signal = np.eye(3)[y] * 3 + rng.normal(size=(60, 3))
    noise = rng.normal(size=(60, 3))
    assert probe_scores(signal[::2], y[::2], signal[1::2], y[1::2], 3, ordinal=True)["auroc"] > 0.95
    assert probe_scores(noise[::2], y[::2], noise[1::2], y[1::2], 3, ordinal=True)["auroc"] < 0.8


def test_the_default_pretraining_cohort_is_disjoint_from_every_split_dataset():
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cohort = config["pretrain"]["cohort"]
    assert config["datasets"][cohort]["pretrain_only"] is True
    sheets = {d: pd.read_csv(ROOT / c["sheet"], sep="\t", dtype=str) for d, c in config["datasets"].items()}
    pre = sheets.pop(cohort)
    for name, sheet in sheets.items():
        assert not set(pre.slide_id) & set(sheet.slide_id), name
        assert not set(pre.patient_id) & set(sheet.patient_id), name
        assert config["datasets"][name]["synthetic_seed"] != config["datasets"][cohort]["synthetic_seed"], name
    used = [*config["table1"]["datasets"], *config["table4"]["datasets"], *config["tilebag"]["datasets"]]
    used += [t["dataset"] for t in config["offload_tables"]["tables"].values()]
    used += [t["external"] for t in config["offload_tables"]["tables"].values()]
    used += [d["from"] for d in config["derived_datasets"].values()]
    assert cohort not in used


def test_a_pretraining_cohort_used_by_a_table_or_sharing_a_patient_is_refused():
    from slidetrain.workflow.sheets import check_pretrain_cohorts

    sheet = lambda ids, pats: pd.DataFrame({"slide_id": ids, "patient_id": pats})  # noqa: E731
    config = {"datasets": {"main": {}, "pre": {"pretrain_only": True}}, "table1": {"datasets": ["main"]}}
    sheets = {"main": sheet(["a", "b"], ["p1", "p2"]), "pre": sheet(["c"], ["p3"])}
    check_pretrain_cohorts(config, sheets)
    with pytest.raises(ConfigError, match="table1.datasets: 'pre' is a pretraining cohort"):
        check_pretrain_cohorts({**config, "table1": {"datasets": ["main", "pre"]}}, sheets)
    with pytest.raises(ConfigError, match="shares slides or patients with main: \\['p2'\\]"):
        check_pretrain_cohorts(config, {**sheets, "pre": sheet(["c"], ["p2"])})


def test_the_pretraining_jobs_read_the_cohort_and_refuse_an_unmarked_one(monkeypatch):
    import copy

    from slidetrain.workflow import build_plan, pretrain_jobs

    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    plan = build_plan(copy.deepcopy(config), ROOT / "workflow" / "schemas" / "sheet.schema.yaml")
    assert pretrain_jobs.pretrain_cohort(plan) == "synthetic_pretrain"
    assert "--tiles-dir results/synthetic_pretrain/tiles" in pretrain_jobs.cohort_args(plan, "synthetic_pretrain")
    assert pretrain_jobs.probe_split(plan) == "results/synthetic/splits/mccv0.csv"
    assert pretrain_jobs.probe_args(plan).endswith("--classes normal low_grade high_grade --ordinal")
    plan.config["pretrain"]["cohort"] = "synthetic"
    with pytest.raises(ConfigError, match="must be marked pretrain_only"):
        pretrain_jobs.pretrain_cohort(plan)
