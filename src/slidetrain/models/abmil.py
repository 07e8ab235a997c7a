"""ABMIL and gated ABMIL (Ilse et al. 2018) on frozen tile features.

Reference sizes: embedding L=500, attention hidden D=128, one branch; Adam lr
5e-4, betas (0.9, 0.999), weight decay 1e-4.
"""

from __future__ import annotations

from torch import Tensor, nn

from slidetrain.configs.mil import ABMILConfig
from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput


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
