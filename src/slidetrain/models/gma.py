"""GMA: the gated MIL attention aggregator of the distributed end-to-end paper (Campanella et al.).

Reference size "big" [in, 512, 384] (as CLAM-SB without instance clustering):
Linear(in, 512)-ReLU-Dropout(0.25), gated attention (Linear(512, 384)-Tanh /
Linear(512, 384)-Sigmoid, each with Dropout(0.25)), Linear(512, C) on the
attention-pooled embedding; slide CE. `size: small` gives [in, 512, 256].

Training defaults (REFERENCE_NOTES, "Multi-GPU end-to-end"): SGD, Nesterov
momentum 0.9, lr 5e-4 with a cosine decay to 1e-8, weight decay 0.04, 40
epochs. Known differences: the reference's 10 warm-up epochs and its weight
decay ramp 0.04 -> 0.4 (cosine) have no TrainConfig key; here the lr cosine
starts at epoch 0 and the weight decay stays at 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput, TrainConfig
from slidetrain.models.clam import SIZES  # the same [512, 256] / [512, 384] size table


@dataclass
class GMAConfig(TrainConfig):
    size: str = "big"  # small | big
    dropout: float = 0.25
    epochs: int = 40
    optimizer: str = "sgd"
    lr: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.04
    scheduler: str = "cosine"
    min_lr: float = 1e-8

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size: expected one of {sorted(SIZES)}, got {self.size!r}")


@register("gma", GMAConfig)
class GMA(MILModel):
    has_attention = True

    def __init__(self, in_dim: int, n_classes: int, cfg: GMAConfig):
        super().__init__()
        embed, hidden = SIZES[cfg.size]
        self.embed = nn.Sequential(nn.Linear(in_dim, embed), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.attention = AttentionScores(embed, hidden, 1, gated=True, dropout=cfg.dropout)
        self.classifier = nn.Linear(embed, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        h = self.embed(bag)  # (N, L)
        pooled, weights = attention_pool(h, self.attention(h))  # (1, L), (1, N)
        return MILOutput(logits=self.classifier(pooled[0]), attention=weights[0])
