"""GMA: the gated MIL attention aggregator of the distributed end-to-end paper (Campanella et al.).

Reference: `modules.GMA(ndim, dropout=True, n_classes)` of the authors'
training script (the same lab's public CPath_SAIF,
slide_experiments/code/modules.py), size "big" [in, 512, 384]: embedding
Linear(in, 512)-ReLU-Dropout(0.25)-Linear(512, 512)-ReLU-Dropout(0.25), gated
attention (Linear(512, 384)-Tanh x Linear(512, 384)-Sigmoid, each with
Dropout(0.25), then Linear(384, 1)), Linear(512, C) on the attention-pooled
embedding; every Linear xavier-normal initialised with zero bias; slide CE.
920,707 parameters at in 512, C = 2. `size: small` gives [in, 512, 256].

Training defaults: the authors' script (REFERENCE_NOTES, "Multi-GPU
end-to-end"): SGD, Nesterov momentum 0.9, lr 5e-4 reached by a linear
warm-up over 10 epochs then cosine to 1e-8, both per iteration
(`scheduler: warmup_cosine`); weight decay cosine 0.04 -> 0.4 per iteration
on the weights only, biases and 1-D parameters without decay
(`weight_decay_end`, `no_decay_1d`); 40 epochs. The script has no
validation loop; selection on validation (`selection_metric`) is this
harness's.
"""

from __future__ import annotations

from torch import Tensor, nn

from slidetrain.configs.mil import SIZES, GMAConfig
from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput


@register("gma", GMAConfig)
class GMA(MILModel):
    has_attention = True

    def __init__(self, in_dim: int, n_classes: int, cfg: GMAConfig):
        super().__init__()
        embed, hidden = SIZES[cfg.size]
        self.embed = nn.Sequential(
            nn.Linear(in_dim, embed),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(embed, embed),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
        )
        self.attention = AttentionScores(embed, hidden, 1, gated=True, dropout=cfg.dropout)
        self.classifier = nn.Linear(embed, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        h = self.embed(bag)  # (N, L)
        pooled, weights = attention_pool(h, self.attention(h))  # (1, L), (1, N)
        return MILOutput(logits=self.classifier(pooled[0]), attention=weights[0])
