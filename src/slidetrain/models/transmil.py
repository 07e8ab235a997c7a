"""TransMIL (Shao et al. 2021): a two-layer Nystrom transformer with a convolutional position encoder.

Reference (szc19990412/TransMIL, models/TransMIL.py, with lucidrains'
nystrom-attention) at its default sizes: Linear(in, 512)-ReLU; the tokens
are padded to a square grid by repeating the first tokens, a learnt class
token is prepended; two pre-LayerNorm residual Nystrom-attention layers
(dim 512, 8 heads of 64, 256 landmarks, 6 Moore-Penrose iterations, a
residual depthwise (33, 1) convolution on the values, output dropout 0.1)
with the PPEG (depthwise 7x7 + 5x5 + 3x3 convolutions plus identity on the
token grid) between them; LayerNorm on the class token, Linear(512, C).
Training as the reference: Lookahead-RAdam (k=6, alpha=0.5) lr 2e-4, weight
decay 1e-5 applied decoupled and not to biases or 1-D parameters
(`decoupled_weight_decay`, `no_decay_1d`), no schedule, 2 bags accumulated
per step (`accumulation: 2`), selection on and early stopping after 10
epochs without a gain in the validation loss, 200 epochs at most.
Mixed precision (`amp`, on): the forward runs under fp16 autocast when the
bag is on a CUDA device (the reference trains in fp16), in fp32 elsewhere;
the MIL trainer runs on the CPU, so there it is fp32 and no GradScaler is
needed (a CUDA trainer must add one). Differences: the reference's
Lightning loop divides the loss by the accumulation count for every step;
here a last incomplete window is averaged over its own slides.

Nystrom attention pads the sequence with zero tokens at the front up to a
multiple of the landmark count, as the reference does, so bags with fewer
tokens than landmarks work (their landmarks are then the tokens themselves
and the attention is exact up to the pseudo-inverse iterations).

The class token's attention is not a per-tile softmax under the Nystrom
approximation, so TransMIL exports no attention (`has_attention = False`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidetrain.configs.mil import TransMILConfig
from slidetrain.models import register
from slidetrain.models.base import MILModel, MILOutput


def iterative_pinv(x: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) by the Razavi et al. iteration, as Nystromformer uses."""
    abs_x = x.abs()
    # the initial scale uses the largest row / column sums over the whole batch, as the reference
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystromformer self-attention (Xiong et al. 2021) on one sequence (n, dim)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads,
            heads,
            (residual_kernel, 1),
            padding=(residual_kernel // 2, 0),
            groups=heads,
            bias=False,
        )

    def forward(self, x: Tensor, query_row: int | None = None) -> tuple[Tensor, Tensor | None]:  # x: (n, dim)
        """Output (n, dim) and, if `query_row` is given, that token's approximate attention (h, n)."""
        n = x.shape[0]
        m = self.landmarks
        pad = (-n) % m
        x = F.pad(x, (0, 0, pad, 0))  # (n', dim): zero tokens in front, n' a multiple of m
        n_pad = x.shape[0]
        qkv = self.to_qkv(x).view(n_pad, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(1, 2, 0, 3)  # each (h, n', d)
        q = q * self.scale
        group = n_pad // m
        # landmarks: means of consecutive groups of tokens
        q_land = q.reshape(self.heads, m, group, self.dim_head).mean(2)  # (h, m, d)
        k_land = k.reshape(self.heads, m, group, self.dim_head).mean(2)  # (h, m, d)
        kernel1 = torch.softmax(q @ k_land.transpose(1, 2), dim=-1)  # (h, n', m)
        kernel2 = torch.softmax(q_land @ k_land.transpose(1, 2), dim=-1)  # (h, m, m)
        kernel3 = torch.softmax(q_land @ k.transpose(1, 2), dim=-1)  # (h, m, n')
        left = kernel1 @ iterative_pinv(kernel2, self.pinv_iterations)  # (h, n', m)
        out = left @ (kernel3 @ v)  # (h, n', d)
        out = out + self.res_conv(v.unsqueeze(0))[0]  # (h, n', d)
        out = out.transpose(0, 1).reshape(n_pad, self.heads * self.dim_head)  # (n', h*d)
        row = None
        if query_row is not None:  # one row of the approximated attention matrix: cheap, (h, m) @ (h, m, n')
            row = (left[:, pad + query_row : pad + query_row + 1] @ kernel3)[:, 0, pad:]  # (h, n)
        return self.to_out(out)[-n:], row  # (n, dim)


class TransLayer(nn.Module):
    def __init__(self, cfg: TransMILConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = NystromAttention(
            cfg.dim,
            heads=cfg.heads,
            dim_head=cfg.dim // cfg.heads,
            landmarks=cfg.landmarks,
            pinv_iterations=cfg.pinv_iterations,
            residual_kernel=cfg.residual_kernel,
            dropout=cfg.dropout,
        )

    def forward(self, x: Tensor, query_row: int | None = None) -> tuple[Tensor, Tensor | None]:  # (n, dim)
        out, row = self.attn(self.norm(x), query_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7/5/3 convolutions plus identity on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:  # x: (1 + side^2, dim), class token first
        cls, tokens = x[:1], x[1:]
        grid = tokens.T.reshape(1, x.shape[1], side, side)  # (1, dim, side, side), row-major
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2)[0].T])  # (1 + side^2, dim)


@register("transmil", TransMILConfig)
class TransMIL(MILModel):
    """Exported attention: the class token's row of the last layer's Nystrom-approximated attention,
    averaged over heads, folded from the square grid back onto the N tiles (the repeated filler
    tokens add to the tiles they copy), clipped at 0 and normalised to sum 1 (the approximation
    can leave small negative entries)."""

    has_attention = True

    def __init__(self, in_dim: int, n_classes: int, cfg: TransMILConfig):
        super().__init__()
        self.amp = cfg.amp
        self.fc = nn.Sequential(nn.Linear(in_dim, cfg.dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, cfg.dim))
        self.layer1 = TransLayer(cfg)
        self.pos = PPEG(cfg.dim)
        self.layer2 = TransLayer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.classifier = nn.Linear(cfg.dim, n_classes)

    def forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and bag.is_cuda):
            out = self._forward(bag)
        return MILOutput(logits=out.logits.float(), attention=out.attention.float())

    def _forward(self, bag: Tensor) -> MILOutput:  # bag: (N, D)
        h = self.fc(bag)  # (N, dim)
        n = h.shape[0]
        side = math.isqrt(n)
        side += side * side < n
        extra = side * side - n
        if extra:  # fill the square grid by repeating the first tokens
            h = torch.cat([h, h[torch.arange(extra, device=h.device) % n]])  # (side^2, dim)
        x = torch.cat([self.cls_token, h])  # (1 + side^2, dim)
        x, _ = self.layer1(x)
        x = self.pos(x, side)
        x, row = self.layer2(x, query_row=0)  # row: (h, 1 + side^2)
        scores = row.detach().mean(0)[1:]  # (side^2,) over grid tokens
        per_tile = torch.zeros(n, dtype=scores.dtype, device=scores.device)
        per_tile.index_add_(0, torch.arange(side * side, device=scores.device) % n, scores)  # fillers -> originals
        per_tile = per_tile.clamp_min(0)
        total = per_tile.sum()
        attention = per_tile / total if total > 0 else torch.full_like(per_tile, 1.0 / n)
        return MILOutput(logits=self.classifier(self.norm(x[0])), attention=attention)  # (C,), (N,)
