"""DSMIL (Li et al. 2021): dual-stream MIL with a max-instance stream and a critical-instance attention stream.

Reference (binli123/dsmil-wsi, dsmil.py + train_tcga.py) at its default
sizes: instance classifier Linear(in, C); bag stream
q = Linear(in, 128)-ReLU-Linear(128, 128)-Tanh (`non_linearity=1`),
v = identity (`passing_v=False`; `passing_v=True` gives
Dropout-Linear(in, in)-ReLU), attention softmax over instances of
Q q_crit^T / sqrt(128) where q_crit is the query of each class's critical
instance (highest instance score), bag scores Conv1d(C, C, kernel=in).
Loss 0.5 BCE-with-logits(bag, one-hot) + 0.5 BCE-with-logits(max instance
score, one-hot). Adam lr 1e-4, betas (0.5, 0.9), weight decay 1e-3, cosine to
5e-6 (REFERENCE_NOTES; train_tcga.py's own defaults moved between 2e-4/5e-3
and 1e-4/1e-3 over its history), 50 epochs, orthogonal weight init with zero
biases (the reference's `apply_sparse_init`).

Choices where the contract and the reference differ:
- Labels are one-hot over C outputs (the reference's multi-class form; its
  Camelyon16 set-up uses a single positive-class output instead). So
  `out.logits` is (C,) for binary tasks too.
- `probabilities` uses sigmoids, as the reference trains with BCE:
  `prediction: bag` (default, the reference with `--average` off) is
  sigmoid(bag logits); `prediction: average` is 0.5 sigmoid(bag) + 0.5
  sigmoid(max-instance), the reference's `--average` mode. The C sigmoids
  are independent, so they are divided by their sum to give the (C,)
  distribution the metrics expect (argmax and per-class ranking, hence
  accuracy and AUC, are unchanged by that).
- Selection and early stopping as the reference: the model of the best
  (accuracy + mean AUC) / 2 on validation (`selection_metric: val_acc_auroc`),
  training stops after 10 epochs without a gain (`early_stopping_patience`).
  The reference thresholds each class's sigmoid for its accuracy; here
  accuracy is that of the argmax (a deliberate difference for C > 2 and for
  an off-0.5 optimal threshold).
- The attention exported for heatmaps is the (C, N) softmax over instances.
- Class weights scale the whole slide loss by the weight of its label (the
  reference has none).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.mil import DSMILConfig
from slidetrain.models import register
from slidetrain.models.base import MILModel, MILOutput


@register("dsmil", DSMILConfig)
class DSMIL(MILModel):
    has_attention = True

    def __init__(self, in_dim: int, n_classes: int, cfg: DSMILConfig):
        super().__init__()
        self.cfg = cfg
        self.n_classes = n_classes
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        if cfg.nonlinear_query:
            self.q = nn.Sequential(
                nn.Linear(in_dim, cfg.query_dim),
                nn.ReLU(),
                nn.Linear(cfg.query_dim, cfg.query_dim),
                nn.Tanh(),
            )
        else:
            self.q = nn.Linear(in_dim, cfg.query_dim)
        if cfg.passing_v:
            self.v = nn.Sequential(nn.Dropout(cfg.dropout_v), nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.v = nn.Identity()
        # one output per class, each a dot product over the class's (in_dim,) bag embedding
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)
        if cfg.orthogonal_init:
            for m in self.modules():
                if isinstance(m, nn.Linear | nn.Conv1d):
                    nn.init.orthogonal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        instance_scores = self.instance_classifier(bag)  # (N, C)
        critical = instance_scores.argmax(dim=0)  # (C,) index of each class's top instance
        queries = self.q(bag)  # (N, Q)
        q_crit = queries[critical]  # (C, Q)
        scores = queries @ q_crit.T / math.sqrt(queries.shape[1])  # (N, C)
        weights = torch.softmax(scores, dim=0)  # (N, C), sums to 1 over instances
        embedding = weights.T @ self.v(bag)  # (C, D)
        bag_logits = self.bag_classifier(embedding.unsqueeze(0)).view(-1)  # (C,)
        max_logits = instance_scores.max(dim=0).values  # (C,)
        return MILOutput(logits=bag_logits, attention=weights.T, extras={"max_logits": max_logits})

    def loss(self, out: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> Tensor:
        target = F.one_hot(label.view(()), self.n_classes).to(out.logits.dtype)  # (C,)
        bag = F.binary_cross_entropy_with_logits(out.logits, target)
        inst = F.binary_cross_entropy_with_logits(out.extras["max_logits"], target)
        loss = (1.0 - self.cfg.max_weight) * bag + self.cfg.max_weight * inst
        if class_weights is not None:
            loss = loss * class_weights[label]
        return loss

    def probabilities(self, out: MILOutput) -> Tensor:
        p = torch.sigmoid(out.logits)  # (C,)
        if self.cfg.prediction == "average":
            p = 0.5 * p + 0.5 * torch.sigmoid(out.extras["max_logits"])
        return p / p.sum().clamp_min(1e-12)
