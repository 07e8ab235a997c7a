"""ABMIL and gated ABMIL (Ilse et al. 2018) on frozen tile features.

Reference sizes: embedding L=500, attention hidden D=128, one branch; Adam lr
5e-4, betas (0.9, 0.999), weight decay 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput, TrainConfig


@dataclass
class ABMILConfig(TrainConfig):
    embed_dim: int = 500  # L
    attention_dim: int = 128  # D
    dropout: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


class _ABMIL(MILModel):
    has_attention = True
    gated = False

    def __init__(self, in_dim: int, n_classes: int, cfg: ABMILConfig):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, cfg.embed_dim), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = AttentionScores(cfg.embed_dim, cfg.attention_dim, 1, gated=self.gated)
        self.classifier = nn.Linear(cfg.embed_dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        h = self.embed(bag)  # (N, L)
        scores = self.attention(h)  # (1, N)
        pooled, weights = attention_pool(h, scores)  # (1, L), (1, N)
        return MILOutput(logits=self.classifier(pooled)[0], attention=weights[0])


@register("abmil", ABMILConfig)
class ABMIL(_ABMIL):
    gated = False


@register("gabmil", ABMILConfig)
class GatedABMIL(_ABMIL):
    gated = True
