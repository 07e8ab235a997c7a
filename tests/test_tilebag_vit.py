"""Foundation-model (ViT) encoders in tile-bag training: weights from a local file, AMP, frozen first
blocks and layer-wise learning-rate decay, on the plain and distributed paths."""

from __future__ import annotations

import pytest
import torch

import test_train_tilebag
from slidetrain.errors import ConfigError
from slidetrain.models.encoders import build_encoder
from slidetrain.models.foundation import build_foundation, sha256_of
from slidetrain.train.tilebag import fit_tilebag, tilebag_config
from slidetrain.train.tilebag.encoder_stages import (
    encoder_groups,
    freeze_first_blocks,
    parameter_stages,
)
from slidetrain.train.tilebag.model import build_tilebag_model, param_groups, set_train_mode
from test_train_tilebag import PARAMS, SAMPLING, data_args

split = test_train_tilebag.split  # the same module-scoped split fixture

VIT = {
    **PARAMS,
    "backbone": "vit_tiny_test",
    "epochs": 2,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "weight_decay_end": None,
    "aggregator_params": {"dropout": 0.0},
}


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """The tiny ViT's weights under the published checkpoints' key names, saved as the cards ship them."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vit") / "vit_tiny_test.safetensors"
    state = build_foundation("vit_tiny_test", seed=11).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_stages_follow_depth_for_resnets_and_vits():
    stages, n = parameter_stages(build_encoder("resnet18"))
    assert n == 5  # stem, layer1..layer4
    by_name = {name: s for name, _, s in stages}
    assert by_name["trunk.0.weight"] == 0 and by_name["trunk.4.0.conv1.weight"] == 1
    assert by_name["trunk.7.1.bn2.weight"] == 4
    stages, n = parameter_stages(build_encoder("vit_tiny_test"))
    assert n == 4  # embedding, 2 blocks, final norm
    by_name = {name: s for name, _, s in stages}
    assert by_name["model.patch_embed.proj.weight"] == 0 and by_name["model.cls_token"] == 0
    assert by_name["model.blocks.0.attn.qkv.weight"] == 1 and by_name["model.blocks.1.mlp.fc2.bias"] == 2
    assert by_name["model.norm.weight"] == 3


def test_layer_decay_scales_each_stage_and_the_schedule_keeps_the_ratios():
    from slidetrain.train.optim import build_optimizer, build_scheduler

    cfg = tilebag_config(
        {**VIT, "layer_decay": 0.5, "lr_encoder": 0.8, "scheduler": "warmup_cosine", "warmup_epochs": 1, "epochs": 3}
    )
    model = build_tilebag_model(cfg, 2, seed=0)
    groups = param_groups(model, cfg)
    enc = [g for g in groups if g["part"] == "encoder"]
    assert [g["lr"] for g in enc] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert sum(len(g["params"]) for g in enc) == len(list(model.encoder.parameters()))
    opt = build_optimizer(groups, cfg)
    schedule = build_scheduler(opt, cfg, iters_per_epoch=4)
    for _ in range(6):
        schedule.step_iteration()
        lrs = {g["initial_lr"]: g["lr"] for g in opt.param_groups if g.get("part") == "encoder"}
        top = lrs[0.8]
        assert all(lr == pytest.approx(top * base / 0.8) for base, lr in lrs.items())


def test_freezing_every_block_is_refused_and_frozen_encoders_take_no_block_keys():
    with pytest.raises(ConfigError, match="every block"):
        freeze_first_blocks(build_encoder("vit_tiny_test"), 2)
    with pytest.raises(ConfigError, match="frozen"):
        tilebag_config({**VIT, "encoder": "frozen", "freeze_blocks": 1})


def test_frozen_resnet_blocks_keep_weights_and_batchnorm_statistics(tiled_synthetic, split, tmp_path):
    params = {**PARAMS, "epochs": 1, "freeze_blocks": 2}
    fit_tilebag(params, sampling=SAMPLING, out_dir=tmp_path / "r", seed=0, **data_args(tiled_synthetic, split))
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=False)["state_dict"]
    initial = build_tilebag_model(tilebag_config(params), 2, seed=0).state_dict()
    frozen = [
        k
        for k in initial
        if k.startswith(("encoder.trunk.0.", "encoder.trunk.1.", "encoder.trunk.4.", "encoder.trunk.5."))
    ]
    assert any("running_mean" in k for k in frozen)
    changed = [k for k in frozen if not torch.equal(initial[k], saved[k])]
    assert not changed, f"frozen stem/layer1/layer2 moved: {changed[:5]}"
    later = [k for k in initial if k.startswith("encoder.trunk.7.") and k.endswith("weight")]
    assert not all(torch.equal(initial[k], saved[k]) for k in later)  # layer4 did train


def test_train_mode_keeps_frozen_batchnorm_in_eval():
    cfg = tilebag_config({**PARAMS, "freeze_blocks": 1})
    model = build_tilebag_model(cfg, 2, seed=0)
    set_train_mode(model, cfg)
    assert not model.encoder.trunk[1].training and not model.encoder.trunk[4][0].bn1.training  # stem, layer1
    assert model.encoder.trunk[5][0].bn1.training  # layer2 trains


def test_vit_from_a_local_weights_file_trains_with_amp_frozen_blocks_and_layer_decay(
    tiled_synthetic, split, vit_weights, tmp_path
):
    params = {
        **VIT,
        "weights": str(vit_weights),
        "weights_sha256": sha256_of(vit_weights),
        "amp": True,
        "freeze_blocks": 1,
        "layer_decay": 0.75,
    }
    out = tmp_path / "vit"
    fit_tilebag(params, sampling=SAMPLING, out_dir=out, seed=0, **data_args(tiled_synthetic, split))
    saved = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    start = build_foundation("vit_tiny_test", str(vit_weights)).state_dict()
    assert all(
        torch.equal(start[k], saved["encoder." + k])
        for k in start
        if k.startswith(("model.patch_embed.", "model.cls_token", "model.pos_embed", "model.blocks.0."))
    )
    assert not torch.equal(start["model.blocks.1.attn.qkv.weight"], saved["encoder.model.blocks.1.attn.qkv.weight"])
    import pandas as pd

    h = pd.read_csv(out / "history.csv")
    assert h.train_loss.notna().all() and len(h) == 2


def test_a_wrong_checksum_stops_the_run_naming_the_model(tiled_synthetic, split, vit_weights, tmp_path):
    from slidetrain.models.foundation import WeightsError

    params = {**VIT, "weights": str(vit_weights), "weights_sha256": "0" * 64}
    with pytest.raises(WeightsError, match="vit_tiny_test"):
        fit_tilebag(params, sampling=SAMPLING, out_dir=tmp_path / "bad", seed=0, **data_args(tiled_synthetic, split))


def test_encoder_groups_hold_only_trainable_parameters():
    encoder = build_encoder("vit_tiny_test")
    freeze_first_blocks(encoder, 1)
    for decay in (1.0, 0.5):
        ids = {id(p) for g in encoder_groups(encoder, 1.0, decay) for p in g["params"]}
        assert ids == {id(p) for p in encoder.parameters() if p.requires_grad}


@pytest.mark.equivalence
def test_ranked_vit_with_frozen_blocks_and_layer_decay_equals_one_process(tiled_synthetic, split, tmp_path):
    """The distributed executor builds the same per-stage groups and keeps frozen blocks frozen (float64: exact)."""
    from test_tilebag_ranked import PARAMS as RANKED_PARAMS
    from test_tilebag_ranked import assert_same_run, torchrun_train

    params = {**RANKED_PARAMS, "backbone": "vit_tiny_test", "freeze_blocks": 1, "layer_decay": 0.5}
    fit_tilebag(params, sampling=SAMPLING, out_dir=tmp_path / "one", seed=0, **data_args(tiled_synthetic, split))
    proc = torchrun_train(tmp_path / "ranked", tiled_synthetic, split, {**params, "executor": "distributed"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "ranked")
