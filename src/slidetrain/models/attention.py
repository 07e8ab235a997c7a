"""Attention pooling blocks shared by ABMIL, CLAM, DTFD, GMA and the local-learning heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AttentionScores(nn.Module):
    """Ilse et al. attention: a_i = w^T tanh(V h_i), optionally gated by sigm(U h_i).

    Returns raw (pre-softmax) scores (n_branches, N) so callers can softmax,
    top-k or export them.
    """

    def __init__(self, in_dim: int, hidden: int, n_branches: int = 1, gated: bool = False, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(hidden, n_branches)

    def forward(self, h: Tensor) -> Tensor:  # h: (N, in_dim)
        a = self.V(h)  # (N, hidden)
        if self.U is not None:
            a = a * self.U(h)
        return self.w(a).transpose(0, 1)  # (n_branches, N)


def attention_pool(h: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over instances, then weighted sum. h (N, D), scores (B, N) -> ((B, D), weights (B, N))."""
    weights = torch.softmax(scores, dim=1)
    return weights @ h, weights
