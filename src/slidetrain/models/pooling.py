"""Max- and mean-pooling baselines: a shared tile embedding, pooled over the bag, then a linear classifier.

The local-learning paper's "Max-pooling" / "Avg-pooling" rows pool ImageNet
ResNet34 tile features; the small embedding layer lets pooling act on learnt
rather than raw ImageNet channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from slidetrain.configs.mil import PoolingConfig
from slidetrain.models import register
from slidetrain.models.base import MILModel, MILOutput


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
