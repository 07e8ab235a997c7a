"""DTFD-MIL (Zhang et al. 2022): double-tier feature distillation over random pseudo-bags.

Reference (hrzhang1123/DTFD-MIL, Main_DTFD_MIL.py + Model/) at its default
sizes: DimReduction Linear(in, 512, bias=False)-ReLU; tier 1 = gated
attention (L=512, D=128) + Linear(512, C) on each of 4 pseudo-bags (a random
split of the instances, every pseudo-bag labelled with the slide label);
distillation "AFS" (the attention-weighted pooled feature of each pseudo-bag;
"MaxS" / "MaxMinS" pick the instance(s) whose class-activation score for the
last class is highest / highest and lowest, `instances_per_group` of each);
tier 2 = gated attention (512, 128) + Linear(512, C) over the distilled
features. Loss = mean tier-1 CE over pseudo-bags + tier-2 CE. Two Adam
optimisers (tier 1, tier 2) lr 1e-4, weight decay 1e-4, gradient norms
clipped at 5 separately for the dimension reduction, the tier-1 attention,
the tier-1 classifier and tier 2 (`clip_groups`), 200 epochs, lr x0.2 at
epoch 100 (the reference's MultiStepLR; `scheduler: cosine` is the
alternative).

Tier-1 gradient (`tier1_gradient`): the reference steps tier 1 on the tier-1
loss and zeroes the tier-2 gradient that reaches tier-1 parameters before it
is applied, so tier 1 learns from the tier-1 loss only. `tier1` (default)
gives that effect in one backward pass: tier 2 reads the distilled features
detached. `sum` lets the tier-2 gradient flow into tier 1 as well (the
summed variant).

Selection (`selection`): `config` (default) selects on `selection_metric`
over every epoch, as every other method here; `reference` is the reference's
rule: tier-2 validation AUC, only in the last 20% of epochs.

Choices where the reference is ambiguous:
- Pseudo-bags: min(4, N) of them, so no pseudo-bag is empty (the reference
  would form empty ones for N < 4). Training draws a fresh random split per
  forward from torch's global generator; eval uses a split drawn from a
  generator seeded with N, so a slide's prediction is reproducible (the
  reference redraws it at random at test time).
- Exported attention (N,): each tile's softmax weight inside its pseudo-bag
  times the tier-2 weight of that pseudo-bag's distilled feature(s); it sums
  to 1 over the slide.
- Class weights scale the whole slide loss by the weight of its label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.mil import DTFDConfig
from slidetrain.models import register
from slidetrain.models.attention import AttentionScores, attention_pool
from slidetrain.models.base import MILModel, MILOutput


@register("dtfd", DTFDConfig)
class DTFD(MILModel):
    has_attention = True

    def __init__(self, in_dim: int, n_classes: int, cfg: DTFDConfig):
        super().__init__()
        self.cfg = cfg
        L, D = cfg.embed_dim, cfg.attention_dim
        # tier 1
        self.reduce = nn.Sequential(nn.Linear(in_dim, L, bias=False), nn.ReLU())
        self.attention = AttentionScores(L, D, 1, gated=True)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(L, n_classes)
        # tier 2
        self.tier2_attention = AttentionScores(L, D, 1, gated=True)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.tier2_classifier = nn.Linear(L, n_classes)

    def tier1_parameters(self) -> list[nn.Parameter]:
        return [
            *self.reduce.parameters(),
            *self.attention.parameters(),
            *self.classifier.parameters(),
        ]

    def param_groups(self) -> list[list[nn.Parameter]]:
        tier1 = self.tier1_parameters()
        ids = {id(p) for p in tier1}
        return [tier1, [p for p in self.parameters() if id(p) not in ids]]

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The reference clips dimReduction, attention, classifier and tier 2 (UClassifier) separately."""
        tier2 = self.param_groups()[1]
        return [
            list(self.reduce.parameters()),
            list(self.attention.parameters()),
            list(self.classifier.parameters()),
            tier2,
        ]

    def _split(self, n: int, device: torch.device) -> tuple[Tensor, ...]:
        if self.training:
            perm = torch.randperm(n)
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        return perm.to(device).tensor_split(min(self.cfg.n_groups, n))

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        n = bag.shape[0]
        h = self.reduce(bag)  # (N, L); row-wise, so reducing before the split is the same
        scores = self.attention(h)[0]  # (N,)
        groups = self._split(n, bag.device)
        per = self.cfg.instances_per_group
        if self.cfg.distill != "AFS":  # every pseudo-bag contributes the same number of features
            per = min(per, min(len(g) for g in groups))
        sub_logits, distilled, within = [], [], torch.zeros_like(scores)
        for idx in groups:
            hg = h[idx]  # (n_g, L)
            a = torch.softmax(scores[idx], dim=0)  # (n_g,)
            within = within.index_put((idx,), a)
            weighted = hg * a[:, None]  # (n_g, L)
            pooled = weighted.sum(0)  # (L,)
            sub_logits.append(self.classifier(self.dropout1(pooled)))  # (C,)
            if self.cfg.distill == "AFS":
                distilled.append(pooled[None])  # (1, L)
            else:
                # instance class-activation scores (no bias, as the reference's get_cam_1d)
                cam = torch.softmax(weighted @ self.classifier.weight.T, dim=1)[:, -1]  # (n_g,)
                order = torch.argsort(cam, descending=True)
                pick = order[:per]
                if self.cfg.distill == "MaxMinS":
                    pick = torch.cat([pick, order[-per:]])
                distilled.append(hg[pick])  # (per or 2 per, L)
        features = torch.cat(distilled)  # (G * f, L)
        if self.cfg.tier1_gradient == "tier1":  # tier 1 learns from its own loss only (the reference's effect)
            features = features.detach()
        pooled2, w2 = attention_pool(features, self.tier2_attention(features))  # (1, L), (1, G*f)
        logits = self.tier2_classifier(self.dropout2(pooled2[0]))  # (C,)
        group_weight = w2[0].view(len(groups), -1).sum(1)  # (G,)
        member = torch.empty(n, dtype=torch.long, device=bag.device)
        for g, idx in enumerate(groups):
            member[idx] = g
        attention = within * group_weight[member]  # (N,)
        return MILOutput(logits=logits, attention=attention, extras={"sub_logits": torch.stack(sub_logits)})

    def loss(self, out: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> Tensor:
        sub = out.extras["sub_logits"]  # (G, C)
        tier1 = F.cross_entropy(sub, label.view(1).expand(sub.shape[0]))
        tier2 = F.cross_entropy(out.logits.unsqueeze(0), label.view(1))
        loss = tier1 + tier2
        if class_weights is not None:
            loss = loss * class_weights[label]
        return loss
