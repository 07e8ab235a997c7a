"""The tile-bag model: a tile encoder from the registry and a MIL aggregator from the registry.

`TileBagConfig` is the method block of a tile-bag run (optimiser and schedule
keys from TrainConfig, with Campanella et al.'s values as defaults: SGD
Nesterov, lr 5e-4 after 10 warm-up epochs, cosine to 1e-8 per iteration,
weight decay 0.04 -> 0.4 on weights only, 40 epochs, 50% of the training
slides per epoch, GMA aggregator).
"""

from __future__ import annotations

import torch
from torch import nn

from slidetrain.configs.tilebag import TileBagConfig  # noqa: F401 (re-exported)
from slidetrain.errors import ConfigError
from slidetrain.models import build_model, method_config
from slidetrain.models.base import MILModel
from slidetrain.models.encoders import build_encoder, encoder_dim
from slidetrain.train.tilebag.encoder_stages import (
    encoder_groups,
    freeze_first_blocks,
    keep_frozen_norms_in_eval,
)


class TileBagModel(nn.Module):
    """encoder (B, 3, P, P) -> (B, D); aggregator (K, D) -> MILOutput."""

    def __init__(self, encoder: nn.Module, aggregator: MILModel):
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator


def build_tilebag_model(cfg: TileBagConfig, n_classes: int, seed: int) -> TileBagModel:
    encoder = build_encoder(cfg.backbone, cfg.weights, seed=seed, sha256=cfg.weights_sha256 or None)
    agg_cfg = method_config(cfg.aggregator, cfg.aggregator_params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aggregator = build_model(cfg.aggregator, encoder_dim(cfg.backbone), n_classes, agg_cfg)
    if cfg.encoder == "frozen":
        encoder.requires_grad_(False)
    else:
        freeze_first_blocks(encoder, cfg.freeze_blocks)
    return TileBagModel(encoder, aggregator)


def param_groups(model: TileBagModel, cfg: TileBagConfig) -> list[dict]:
    """Parameter groups per part, each with its own lr (the optimiser splits off biases/1-D params).

    The encoder's trainable parameters form one group, or one per depth stage under layer_decay.
    """
    groups = []
    if cfg.encoder == "trained":
        groups += encoder_groups(model.encoder, cfg.lr_encoder or cfg.lr, cfg.layer_decay)
    groups.append(
        {"params": list(model.aggregator.parameters()), "lr": cfg.lr_aggregator or cfg.lr, "part": "aggregator"}
    )
    return groups


def logged_rates(optimizer: torch.optim.Optimizer) -> dict:
    """lr and weight decay for history.csv: the aggregator's first group's, which one process and rank 0
    of a distributed run both hold (the encoder's groups differ in number and lr under layer_decay)."""
    group = next(g for g in optimizer.param_groups if g.get("part") == "aggregator")
    return {"lr": group["lr"], "weight_decay": group["weight_decay"]}


def set_train_mode(model: TileBagModel, cfg: TileBagConfig) -> None:
    """Training mode, except a frozen encoder (or its frozen blocks) stays in eval mode: frozen BatchNorm
    statistics never move."""
    model.train()
    if cfg.encoder == "frozen":
        model.encoder.eval()
    else:
        keep_frozen_norms_in_eval(model.encoder)


def selection_metric(cfg: TileBagConfig, ordinal: bool) -> str:
    if cfg.selection_metric == "auto":
        return "val_qwk" if ordinal else "val_auroc"
    allowed = ("val_loss", "val_auroc", "val_accuracy", "val_qwk")
    if cfg.selection_metric not in allowed:
        raise ConfigError(f"selection_metric: expected auto or one of {list(allowed)}, got {cfg.selection_metric!r}")
    return cfg.selection_metric
