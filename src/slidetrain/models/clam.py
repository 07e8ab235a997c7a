"""CLAM-SB and CLAM-MB (Lu et al. 2021): gated attention MIL with instance-level clustering.

Reference (mahmoodlab/CLAM, models/model_clam.py + main.py) at its default
sizes: size "small" [in, 512, 256] ("big" [in, 512, 384]);
Linear(in, 512)-ReLU-Dropout(0.25), gated attention (Linear(512, 256)-Tanh /
Linear(512, 256)-Sigmoid, each with Dropout(0.25)); SB: one attention branch
and Linear(512, C); MB: C branches and one Linear(512, 1) per class. One
instance classifier Linear(512, 2) per class. Loss 0.7 bag CE + 0.3
instance loss. Adam lr 1e-4, weight decay 1e-5, no schedule, 200 epochs
(the code's defaults); here early stopping on the validation loss with
patience 20 after epoch 50 (the README commands' `--early_stopping`) is on.

Instance clustering (training only, computed in `loss` because it needs the
label): for the true class, the k_sample highest-attention tiles are
positives and the k_sample lowest are negatives for that class's instance
classifier; with `subtyping`, for every other class the k_sample
highest-attention tiles (of that class's branch in MB, of the single branch
in SB) are negatives for its classifier, and the instance loss is averaged
over classes, as in the reference.

Choices where the reference is ambiguous or crashes:
- `subtyping` defaults to None = "True when C > 2" (the reference sets it
  per task: False for tumour vs normal, True for subtyping).
- A bag of N >= k_sample tiles uses k = k_sample top and k_sample bottom
  tiles, as the reference's topk(8): for k_sample <= N < 2 k_sample the two
  sets overlap (a tile can be a positive and a negative at once), as there.
  Below k_sample the reference's topk fails; here k = N // 2, so positives
  and negatives never overlap, and a 1-tile bag has no instance loss
  (a deliberate difference).
- `inst_loss: ce` (default: the reference code's default when `--inst_loss`
  is not given) or `svm`: the smooth top-1 SVM (Berrada et al. 2018,
  alpha=1, tau=1) that the reference's README commands select.
- `weighted_sample` (a TrainConfig key, default off as in the code; the
  README commands turn it on): class-balanced slide sampling, each epoch
  draws as many training slides as there are, with replacement, slide
  weights 1 / (slides of its class), as the reference's
  WeightedRandomSampler.
- In eval mode `loss` is the bag CE alone, as the reference's validation
  loss (which drives early stopping) is.
- Class weights scale the whole slide loss by the weight of its label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.mil import SIZES, CLAMConfig
from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput


def smooth_top1_svm(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 multiclass SVM: tau * logsumexp((s + alpha * [j != y] - s_y) / tau), batch mean."""
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype))  # (B, K)
    shifted = logits + margin - logits.gather(1, target[:, None])  # (B, K)
    return (tau * torch.logsumexp(shifted / tau, dim=1)).mean()


class _CLAM(MILModel):
    has_attention = True
    multi_branch = False

    def __init__(self, in_dim: int, n_classes: int, cfg: CLAMConfig):
        super().__init__()
        self.cfg = cfg
        self.n_classes = n_classes
        self.subtyping = cfg.subtyping if cfg.subtyping is not None else n_classes > 2
        embed, hidden = SIZES[cfg.size]
        self.embed = nn.Sequential(nn.Linear(in_dim, embed), nn.ReLU(), nn.Dropout(cfg.dropout))
        n_branches = n_classes if self.multi_branch else 1
        self.attention = AttentionScores(embed, hidden, n_branches, gated=True, dropout=cfg.dropout)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(embed, 1) for _ in range(n_classes))
        else:
            self.classifier = nn.Linear(embed, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed, 2) for _ in range(n_classes))

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        h = self.embed(bag)  # (N, L)
        scores = self.attention(h)  # (K, N), K = C (MB) or 1 (SB)
        pooled, weights = attention_pool(h, scores)  # (K, L), (K, N)
        if self.multi_branch:
            logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])  # (C,)
            attention = weights  # (C, N)
        else:
            logits = self.classifier(pooled[0])  # (C,)
            attention = weights[0]  # (N,)
        return MILOutput(logits=logits, attention=attention, extras={"h": h, "weights": weights})

    def _instance_term(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.cfg.inst_loss == "svm":
            return smooth_top1_svm(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(self, h: Tensor, weights: Tensor, label: int) -> Tensor:
        """Clustering loss on the top / bottom attended tiles; h (N, L), weights (K, N)."""
        n = h.shape[0]
        k = self.cfg.k_sample if n >= self.cfg.k_sample else n // 2  # reference topk(k_sample) from N >= k_sample
        if k == 0:
            return h.new_zeros(())
        total = h.new_zeros(())
        for c, clf in enumerate(self.instance_classifiers):
            a = weights[c] if self.multi_branch else weights[0]  # (N,)
            if c == label:
                top = torch.topk(a, k).indices  # (k,)
                bottom = torch.topk(-a, k).indices  # (k,)
                x = h[torch.cat([top, bottom])]  # (2k, L)
                y = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:
                x = h[torch.topk(a, k).indices]  # (k, L): out-of-class evidence
                y = torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            total = total + self._instance_term(clf(x), y)
        if self.subtyping:
            total = total / self.n_classes
        return total

    def loss(self, out: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> Tensor:
        loss = F.cross_entropy(out.logits.unsqueeze(0), label.view(1))
        if self.training:
            inst = self.instance_loss(out.extras["h"], out.extras["weights"], int(label))
            loss = self.cfg.bag_weight * loss + (1.0 - self.cfg.bag_weight) * inst
        if class_weights is not None:
            loss = loss * class_weights[label]
        return loss


@register("clam_sb", CLAMConfig)
class CLAMSB(_CLAM):
    multi_branch = False


@register("clam_mb", CLAMConfig)
class CLAMMB(_CLAM):
    multi_branch = True
