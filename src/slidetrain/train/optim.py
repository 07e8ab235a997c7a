"""Optimisers and schedules named in a method's config block.

Every method's reference optimiser is expressible here: Adam (ABMIL, CLAM,
DSMIL, DTFD), AdamW (local learning), SGD with Nesterov (distributed E2E) and
Lookahead-RAdam (TransMIL).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from slidetrain.errors import ConfigError
from slidetrain.models.base import TrainConfig


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019): every k steps pull slow weights alpha of the way to the fast ones.

    Wraps an inner optimiser; state_dict carries both so a resumed run continues exactly.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"lookahead: expected k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.inner = inner
        self.k, self.alpha = k, alpha
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        self.state = defaultdict(dict)  # slow weights per parameter
        self._steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self.state[p].setdefault("slow", p.detach().clone())
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss

    def state_dict(self) -> dict:
        params = [p for g in self.param_groups for p in g["params"]]
        slow = [self.state[p].get("slow") for p in params]
        return {"inner": self.inner.state_dict(), "slow": slow, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        params = [p for g in self.param_groups for p in g["params"]]
        for p, s in zip(params, state["slow"], strict=True):
            if s is not None:
                self.state[p]["slow"] = s.to(p.device)
        self._steps = state["steps"]


def build_optimizer(params: list[nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One optimiser over `params` (tensors or param-group dicts with their own lr)."""
    name = cfg.optimizer
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if name == "radam_lookahead":
        inner = torch.optim.RAdam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return Lookahead(inner)
    raise ConfigError(f"optimizer: unknown value {name!r}; expected adam, adamw, sgd or radam_lookahead")


class _Plateau:
    """ReduceLROnPlateau driven by the validation loss, with the same step(metric) call as the others."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.step_gamma, patience=cfg.plateau_patience
        )

    def step(self, val_loss: float | None = None) -> None:
        self.inner.step(val_loss if val_loss is not None and math.isfinite(val_loss) else float("inf"))

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class _EpochScheduler:
    """Wraps torch's epoch schedulers so every schedule is stepped as `step(val_loss)` once per epoch."""

    def __init__(self, inner):
        self.inner = inner

    def step(self, val_loss: float | None = None) -> None:
        if self.inner is not None:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Per-epoch schedule: none | cosine (to min_lr over all epochs) | step (milestones) | plateau (val loss)."""
    opt = optimizer.inner if isinstance(optimizer, Lookahead) else optimizer
    if cfg.scheduler == "none":
        return _EpochScheduler(None)
    if cfg.scheduler == "cosine":
        return _EpochScheduler(
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.min_lr)
        )
    if cfg.scheduler == "step":
        return _EpochScheduler(
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.step_milestones), gamma=cfg.step_gamma)
        )
    if cfg.scheduler == "plateau":
        return _Plateau(opt, cfg)
    raise ConfigError(f"scheduler: unknown value {cfg.scheduler!r}; expected none, cosine, step or plateau")
