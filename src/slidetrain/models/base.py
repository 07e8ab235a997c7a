"""The contract every MIL aggregator keeps, and the config every method starts from.

An aggregator takes one bag of tile features `(N, D)` and returns a
`MILOutput`. Training goes through three hooks so methods with their own
losses (CLAM, DSMIL, DTFD) or stages (MIL-RNN) plug into one harness:
`loss`, `probabilities`, `on_epoch_start`; `param_groups` lets a method ask for
separate optimisers (DTFD's two tiers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.mil import TrainConfig, config_from_dict  # noqa: F401 (re-exported)


@dataclass
class MILOutput:
    logits: Tensor  # (C,) slide-level scores
    attention: Tensor | None = None  # (N,) or (C, N): per-tile scores for heatmaps
    extras: dict = field(default_factory=dict)  # method-specific terms for `loss`


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
