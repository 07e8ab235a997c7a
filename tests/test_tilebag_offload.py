"""The `offload` executor leaves the gradients (and, over an epoch, the weights) of `plain`."""

from __future__ import annotations

import copy

import pytest
import torch

from slidetrain.models import build_model, method_config
from slidetrain.models.encoders import build_encoder
from slidetrain.train.tilebag.executors import PlainExecutor, StepContext, build_executor
from slidetrain.train.tilebag.offload_executor import OffloadExecutor

torch.set_num_threads(1)
pytestmark = pytest.mark.equivalence


def _step(executor, encoder, aggregator, tiles, n_slides=2):
    enc, agg = copy.deepcopy(encoder), copy.deepcopy(aggregator)
    enc.train(), agg.train()
    ctx = StepContext(loss_scale=0.5)
    losses = [
        executor.step(tiles * (1 + s), enc, agg, torch.tensor(s % 2), lambda o, y, a=agg: a.loss(o, y), ctx).loss
        for s in range(n_slides)
    ]
    grads = {f"{i}.{n}": p.grad for i, m in enumerate((enc, agg)) for n, p in m.named_parameters()}
    return losses, grads, enc


# 1 stage under 1 MB: spatial partitions of each tile; 4 stages need room for layer4's weight-gradient
# buffers (2 x 18.9 MB in fp64), which leaves 64 px tiles whole
@pytest.mark.parametrize("stages, max_transfer_mb", [(1, 1.0), (4, 40.0)])
def test_offload_step_equals_plain(stages, max_transfer_mb):
    """fp64: agreement to rounding (fp32 noise of a random ResNet's attention is larger than the check)."""
    dtype, tol = torch.float64, 1e-10
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", "none", seed=0).to(dtype)
    aggregator = build_model("abmil", 512, 2, method_config("abmil", {})).to(dtype)
    tiles = torch.randn(3, 3, 64, 64, dtype=dtype)
    loss_a, ga, _ = _step(PlainExecutor(), encoder, aggregator, tiles)
    executor = OffloadExecutor(stages=stages, max_transfer_mb=max_transfer_mb)
    loss_b, gb, enc = _step(executor, encoder, aggregator, tiles)
    engine = executor.offloaded(enc, torch.device("cpu")).engine
    assert engine.spatial_parts_run > 0 if stages == 1 else engine.parts_run > 0
    assert loss_b == pytest.approx(loss_a, rel=tol)
    scale = max(float(g.abs().max()) for g in ga.values())
    for k in ga:  # per tensor, floored at 1e-3 of the largest (ABMIL's last bias: zero in exact arithmetic)
        err = float((gb[k] - ga[k]).abs().max()) / max(float(ga[k].abs().max()), 1e-3 * scale)
        assert err < tol, (k, err)


def test_registry_builds_offload_and_rejects_bad_settings():
    from slidetrain.errors import ConfigError

    assert isinstance(build_executor("offload"), OffloadExecutor)
    with pytest.raises(ConfigError, match="stages"):
        OffloadExecutor(stages=7)


# The authors' tile-bag recipe (GMA, SGD with warm-up), and the pieces of Big-Layers' as offload_tables
# runs them (ABMIL, weight decay 1e-4 on every parameter, epoch cosine, DEMON momentum decay, per-slide
# augmentation) on SGD: Adam's first steps move each weight by ~lr * sign(g), so weights whose gradient
# is at fp32 rounding level (|g| ~ 1e-8) differ by up to lr between two exact executors; the gradients
# themselves are compared per step in test_offload_step_equals_plain.
RECIPES = {
    "gma_sgd": {"aggregator_params": {"dropout": 0.0}, "warmup_epochs": 1},
    "abmil_demon_cosine_augment": {
        "aggregator": "abmil",
        "optimizer": "sgd",
        "lr": 1e-2,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "weight_decay_end": None,
        "no_decay_1d": False,
        "scheduler": "cosine",
        "warmup_epochs": 0,
        "min_lr": 0.0,
        "momentum_decay": "demon",
        "augment": True,
    },
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_epoch_offload_gives_the_weights_of_plain(recipe, tiled_synthetic, tmp_path, monkeypatch):
    import pandas as pd

    from slidetrain.train.tilebag import fit_tilebag

    root, sheet, refs = tiled_synthetic
    frame = pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in refs],
            "patient_id": [f"p{i}" for i in range(6)],
            "label": ["negative" if r.label == 0 else "positive" for r in refs],
            "part": ["train", "train", "train", "train", "val", "test"],
        }
    )
    frame.to_csv(tmp_path / "split.csv", index=False)
    data = {
        "split_csv": tmp_path / "split.csv",
        "sheet_csv": sheet,
        "slides_dir": root,
        "tiles_dir": root,
        "class_names": ["negative", "positive"],
    }
    params = {
        "backbone": "resnet18",
        "k": 6,
        "input_px": 32,
        "epochs": 1,
        "workers": 0,
        "slides_per_epoch": 0.75,
        "accumulation": 2,
        "selection_metric": "val_loss",
        "eval_tiles": "all",
        "eval_chunk": 16,
        **RECIPES[recipe],
    }
    monkeypatch.setattr(OffloadExecutor, "default_max_transfer_mb", 0.7)  # partitions even at 32 px,
    monkeypatch.setattr(OffloadExecutor, "default_stages", 1)  # with room for layer1's weight gradients
    sampling = {"tile_px": 32, "target_magnification": 5.0}
    for name in ("plain", "offload"):  # float64: equal to rounding over the epoch, on any CPU
        fit_tilebag(
            {**params, "executor": name, "dtype": "float64"}, sampling=sampling, out_dir=tmp_path / name, seed=0, **data
        )
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "offload" / "model.pt", weights_only=False)["state_dict"]
    assert set(a) == set(b)
    assert a["aggregator.classifier.weight" if recipe == "gma_sgd" else next(iter(a))].dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32  # restored after the run
    for k in a:  # weights, BatchNorm running statistics and num_batches_tracked
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12)
