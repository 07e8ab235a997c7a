"""The tile-bag model: a tile encoder from the registry and a MIL aggregator from the registry.

`TileBagConfig` is the method block of a tile-bag run (optimiser and schedule
keys from TrainConfig, with Campanella et al.'s values as defaults: SGD
Nesterov, lr 5e-4 after 10 warm-up epochs, cosine to 1e-8 per iteration,
weight decay 0.04 -> 0.4 on weights only, 40 epochs, 50% of the training
slides per epoch, GMA aggregator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slidetrain.errors import ConfigError
from slidetrain.models import build_model, method_config
from slidetrain.models.base import MILModel, TrainConfig
from slidetrain.models.encoders import ENCODER_NAMES, build_encoder, encoder_dim

ENCODER_MODES = ("trained", "frozen")
EVAL_MODES = ("all", "sampled")


@dataclass
class TileBagConfig(TrainConfig):
    backbone: str = "resnet50"  # tile encoder: a name of models.encoders (resnet18/34 full, resnet50[_trunc])
    weights: str = "none"  # none | imagenet | path to a state dict
    encoder: str = "trained"  # trained | frozen (Big-Layers' baseline: embeddings on the fly, no backward)
    aggregator: str = "gma"  # any registered MIL aggregator
    aggregator_params: dict = field(default_factory=dict)  # its architecture keys (dropout, size, ...)
    executor: str = "plain"  # plain | two_stage | offload | distributed (under torchrun: train/tilebag/ranked.py)
    # distributed: BatchNorm statistics over all encoder ranks' tiles (= plain's, exactly); false = each
    # rank normalises its own K / N tiles, as the authors' script (DDP without SyncBatchNorm)
    sync_bn: bool = False
    k: int = 600  # tiles per slide per step (the authors' k_per_gpu default)
    input_px: int | None = None  # resize tiles to this side before the encoder (None = tile size)
    augment: bool = True  # one draw per slide: flips, quarter turns, colour jitter, Gaussian blur
    slides_per_epoch: float = 0.5  # fraction of the training slides drawn per epoch (the paper: 50%)
    lr_encoder: float | None = None  # None = lr
    lr_aggregator: float | None = None  # None = lr
    amp: bool = False  # CUDA: fp16 autocast + GradScaler; CPU: bf16 autocast
    device: str = "cpu"
    workers: int = 2  # DataLoader worker processes reading tiles (0 = in the training process)
    eval_tiles: str = "all"  # all (every tile, in chunks, no grad) | sampled (eval_repeats x eval_k)
    eval_k: int = 0  # 0 = k
    eval_repeats: int = 1
    eval_chunk: int = 256  # tiles per encoder call at evaluation
    # BatchNorm at evaluation: running (torch's eval mode: the running statistics) | bag (each encoder
    # call normalised by its own tiles' statistics, as every training step is: one slide per step means
    # BN's batch is one slide's bag; running statistics never change). See README for why it matters.
    eval_bn: str = "running"
    # The authors' optimiser (REFERENCE_NOTES "Multi-GPU end-to-end")
    epochs: int = 40
    optimizer: str = "sgd"
    lr: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    no_decay_1d: bool = True
    scheduler: str = "warmup_cosine"
    warmup_epochs: float = 10.0
    min_lr: float = 1e-8
    selection_metric: str = "auto"  # auto = val_auroc (binary) / val_qwk (ordinal); or val_loss, ...

    def __post_init__(self) -> None:
        if self.backbone not in ENCODER_NAMES:
            raise ValueError(f"backbone: expected one of {list(ENCODER_NAMES)}, got {self.backbone!r}")
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder: expected one of {list(ENCODER_MODES)}, got {self.encoder!r}")
        if self.eval_tiles not in EVAL_MODES:
            raise ValueError(f"eval_tiles: expected one of {list(EVAL_MODES)}, got {self.eval_tiles!r}")
        if self.eval_bn not in ("running", "bag"):
            raise ValueError(f"eval_bn: expected running or bag, got {self.eval_bn!r}")
        if self.k < 1 or self.eval_k < 0 or self.eval_repeats < 1 or self.eval_chunk < 1:
            raise ValueError("k, eval_repeats and eval_chunk must be >= 1 and eval_k >= 0")
        if not 0 < self.slides_per_epoch <= 1:
            raise ValueError(f"slides_per_epoch: expected a fraction in (0, 1], got {self.slides_per_epoch}")


class TileBagModel(nn.Module):
    """encoder (B, 3, P, P) -> (B, D); aggregator (K, D) -> MILOutput."""

    def __init__(self, encoder: nn.Module, aggregator: MILModel):
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator


def build_tilebag_model(cfg: TileBagConfig, n_classes: int, seed: int) -> TileBagModel:
    encoder = build_encoder(cfg.backbone, cfg.weights, seed=seed)
    agg_cfg = method_config(cfg.aggregator, cfg.aggregator_params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        aggregator = build_model(cfg.aggregator, encoder_dim(cfg.backbone), n_classes, agg_cfg)
    if cfg.encoder == "frozen":
        encoder.requires_grad_(False)
    return TileBagModel(encoder, aggregator)


def param_groups(model: TileBagModel, cfg: TileBagConfig) -> list[dict]:
    """One parameter group per part, each with its own lr (the optimiser splits off biases/1-D params)."""
    groups = []
    if cfg.encoder == "trained":
        groups.append({"params": list(model.encoder.parameters()), "lr": cfg.lr_encoder or cfg.lr, "part": "encoder"})
    groups.append({"params": list(model.aggregator.parameters()), "lr": cfg.lr_aggregator or cfg.lr,
                   "part": "aggregator"})
    return groups


def set_train_mode(model: TileBagModel, cfg: TileBagConfig) -> None:
    """Training mode, except a frozen encoder stays in eval mode (its BatchNorm statistics never move)."""
    model.train()
    if cfg.encoder == "frozen":
        model.encoder.eval()


def selection_metric(cfg: TileBagConfig, ordinal: bool) -> str:
    if cfg.selection_metric == "auto":
        return "val_qwk" if ordinal else "val_auroc"
    allowed = ("val_loss", "val_auroc", "val_accuracy", "val_qwk")
    if cfg.selection_metric not in allowed:
        raise ConfigError(f"selection_metric: expected auto or one of {list(allowed)}, got {cfg.selection_metric!r}")
    return cfg.selection_metric


def bag_statistics_copy(encoder: nn.Module) -> nn.Module:
    """A copy of `encoder` whose BatchNorm layers normalise with each call's batch statistics (eval_bn: bag).

    Without running buffers, BatchNorm uses the batch's statistics even in eval mode and updates
    nothing, so the trained encoder's state stays untouched.
    """
    import copy

    bag = copy.deepcopy(encoder)
    for m in bag.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
            m.track_running_stats = False
    return bag.eval()
