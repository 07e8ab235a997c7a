"""Max- and mean-pooling baselines: a shared tile embedding, pooled over the bag, then a linear classifier.

The local-learning paper's "Max-pooling" / "Avg-pooling" rows pool ImageNet
ResNet34 tile features; the small embedding layer lets pooling act on learnt
rather than raw ImageNet channels.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from slidetrain.models import register
from slidetrain.models.base import MILModel, MILOutput, TrainConfig


@dataclass
class PoolingConfig(TrainConfig):
    hidden: int = 128
    dropout: float = 0.25
    lr: float = 2e-4
    weight_decay: float = 1e-4


class _PoolingMIL(MILModel):
    reduce: str = "max"

    def __init__(self, in_dim: int, n_classes: int, cfg: PoolingConfig):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.classifier = nn.Linear(cfg.hidden, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.embed(bag)  # (N, H)
        pooled = h.max(dim=0).values if self.reduce == "max" else h.mean(dim=0)  # (H,)
        return MILOutput(logits=self.classifier(pooled))  # (C,)


@register("maxpool", PoolingConfig)
class MaxPoolMIL(_PoolingMIL):
    reduce = "max"


@register("meanpool", PoolingConfig)
class MeanPoolMIL(_PoolingMIL):
    reduce = "mean"
