"""The contract every MIL aggregator keeps, and the config every method starts from.

An aggregator takes one bag of tile features `(N, D)` and returns a
`MILOutput`. Training goes through three hooks so methods with their own
losses (CLAM, DSMIL, DTFD) or stages (MIL-RNN) plug into one harness:
`loss`, `probabilities`, `on_epoch_start`; `param_groups` lets a method ask for
separate optimisers (DTFD's two tiers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.errors import ConfigError


@dataclass
class MILOutput:
    logits: Tensor  # (C,) slide-level scores
    attention: Tensor | None = None  # (N,) or (C, N): per-tile scores for heatmaps
    extras: dict = field(default_factory=dict)  # method-specific terms for `loss`


@dataclass
class TrainConfig:
    """Optimiser and schedule keys shared by every method (its block may override defaults)."""

    epochs: int = 20
    optimizer: str = "adam"  # adam | adamw | sgd | radam_lookahead
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    scheduler: str = "none"  # none | cosine | step | plateau (per epoch) | warmup_cosine (per iteration)
    min_lr: float = 0.0  # cosine floor
    warmup_epochs: float = 0.0  # warmup_cosine: linear lr warm-up from 0 over this many epochs
    weight_decay_end: float | None = None  # None: constant; else cosine weight_decay -> this, per iteration
    no_decay_1d: bool = False  # biases and 1-D parameters get no weight decay
    decoupled_weight_decay: bool = False  # adam / radam_lookahead: decoupled (AdamW-style) decay
    step_milestones: tuple[int, ...] = ()  # step: epochs at which lr *= step_gamma
    step_gamma: float = 0.1
    plateau_patience: int = 5
    accumulation: int = 1  # slides per optimiser step
    grad_clip: float = 0.0  # 0 = off
    class_weights: bool = False  # weight CE by inverse class frequency of the training part
    early_stopping_patience: int = 0  # 0 = off; epochs without validation improvement
    early_stopping_min_epochs: int = 0
    # val_loss | val_auroc | val_accuracy | val_balanced_accuracy | val_acc_auroc ((accuracy + AUROC) / 2)
    selection_metric: str = "val_loss"
    selection_start_fraction: float = 0.0  # epochs before this fraction of the run are never selected
    # class-balanced slide sampling (CLAM's --weighted_sample): each epoch draws len(train) slides with
    # replacement, each with weight 1 / (training slides of its class)
    weighted_sample: bool = False
    max_instances: int = 0  # 0 = all; else random subset per training bag (memory guard)
    # none (the references: raw features) | standardize (per-dimension z-score with the training
    # part's statistics, stored with the model). Random-init encoders give features of mean ~35 and
    # norm ~1000, on which attention MILs saturate at their reference learning rates.
    feature_norm: str = "none"

    def selection_rule(self) -> tuple[str, float]:
        """(history column to select on, fraction of the epochs before selection starts)."""
        return self.selection_metric, self.selection_start_fraction


def config_from_dict(cls: type, params: dict | None, where: str) -> object:
    """Build dataclass `cls` from `params`; an unknown key is an error naming `where.key`."""
    params = dict(params or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}"
        )
    for name, value in list(params.items()):
        default = getattr(cls, name, None) if not callable(getattr(cls, name, None)) else None
        if isinstance(default, tuple) and isinstance(value, list):
            params[name] = tuple(value)
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


class MILModel(nn.Module):
    """Base class of every aggregator in the registry."""

    #: per-tile attention comes back in MILOutput.attention (used for heatmaps)
    has_attention: bool = False

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        raise NotImplementedError

    def loss(self, out: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """Slide-level cross-entropy; methods with their own losses override this.

        With one slide per step, `F.cross_entropy(weight=...)` would normalise the
        weight away (a weighted mean over one sample), so the slide's class weight
        multiplies the loss instead.
        """
        loss = F.cross_entropy(out.logits.unsqueeze(0), label.view(1))
        return loss * class_weights[label] if class_weights is not None else loss

    def probabilities(self, out: MILOutput) -> Tensor:
        """(C,) class probabilities used for metrics."""
        return torch.softmax(out.logits, dim=-1)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets that get one optimiser each (one set by default)."""
        return [list(self.parameters())]

    def group_configs(self, cfg: TrainConfig) -> list[TrainConfig]:
        """The optimiser settings of each param group (MIL-RNN: one per stage); `cfg` for all by default."""
        return [cfg] * len(self.param_groups())

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norms are clipped separately at `grad_clip` (the param groups)."""
        return self.param_groups()

    def accumulation(self, default: int) -> int:
        """Slides per optimiser step in the current stage (MIL-RNN's RNN: 128); `accumulation` by default."""
        return default

    def epoch_bags(self, bags: list[Tensor]) -> list[Tensor]:
        """The training bags of this epoch, after `on_epoch_start` (MIL-RNN stage 1: each bag's top tile).

        Called in eval mode under no_grad; must not draw from the global generators (exact resume).
        """
        return bags

    def on_epoch_start(self, epoch: int, n_epochs: int) -> None:
        """Hook for staged methods (MIL-RNN); epoch counts from 0."""

    def selectable(self) -> bool:
        """Whether the model in its current stage may be selected on validation (MIL-RNN: RNN stage only)."""
        return True
