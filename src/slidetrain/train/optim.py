"""Optimisers and learning-rate / weight-decay schedules named in a method's config block.

Every method's reference optimiser is expressible here: Adam (ABMIL, CLAM,
DSMIL, DTFD), AdamW (local learning), SGD with Nesterov (GMA, distributed
E2E, MIL-RNN's RNN stage) and Lookahead-RAdam (TransMIL).

Public API (the config object is a TrainConfig or any object with the same
attribute names; keys it lacks take the defaults below):

    optimizer = build_optimizer(params, cfg)
    schedule = build_scheduler(optimizer, cfg, iters_per_epoch=n_steps)
    for epoch in range(cfg.epochs):
        for step in ...:
            ... loss.backward(); optimizer.step(); optimizer.zero_grad()
            schedule.step_iteration()   # after every optimiser step
        schedule.step(val_loss)         # once at the end of the epoch

`params` is a list of tensors or of param-group dicts (each may carry its own
"lr"). Keys read from cfg:

- `optimizer`: adam | adamw | sgd | radam_lookahead; `lr`, `weight_decay`,
  `betas`, `momentum`, `nesterov` as in torch.
- `no_decay_1d` (False): every group is split into its >= 2-D weights and its
  biases / 1-D parameters, and the latter get weight decay 0 (the
  Campanella/DINO and timm `filter_bias_and_bn` convention).
- `decoupled_weight_decay` (False): AdamW-style decay for Adam and RAdam
  (TransMIL's reference RAdam decays decoupled).
- `scheduler`: none | cosine | step | exponential | plateau are stepped once
  per epoch by `step(val_loss)` (cosine: to `min_lr` over `epochs`; step:
  x`step_gamma` at `step_milestones`; exponential: x`step_gamma` after every
  epoch, Big-Layers' second PANDA setting with 0.955; plateau: on the
  validation loss). `warmup_cosine` is
  stepped per iteration by `step_iteration()`: the lr of iteration t rises
  linearly from 0 to the group's lr over the first `warmup_epochs *
  iters_per_epoch` iterations (reaching it at the last warm-up iteration),
  then follows a cosine from the group's lr to `min_lr` over the remaining
  iterations of `epochs` epochs.
- `weight_decay_end` (None = constant): the weight decay of the decaying
  groups follows a cosine from `weight_decay` at iteration 0 to
  `weight_decay_end` over all iterations, stepped per iteration (groups with
  decay 0, e.g. the no-decay group, are never touched). Needs
  `iters_per_epoch`, as `warmup_cosine` does.

- `momentum_decay` ("none"): "demon" decays the momentum (Adam's beta1, SGD's
  momentum) per iteration by the DEMON rule (Chen et al. 2022, Big-Layers'
  CAMELYON runs): beta_t = beta_0 (1 - t/T) / ((1 - beta_0) + beta_0 (1 - t/T))
  over the T iterations of `epochs` epochs, from beta_0 at t = 0 to 0 at t = T.
  Needs `iters_per_epoch`.

`iters_per_epoch` is the number of optimiser steps per epoch (e.g.
ceil(slides / accumulation)). Both schedule kinds keep their position in
`state_dict()`, so a resumed run (optimizer and schedule state restored)
continues exactly; the values of iteration t depend on t alone.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from slidetrain.errors import ConfigError

EPOCH_SCHEDULERS = ("none", "cosine", "step", "exponential", "plateau")
ITERATION_SCHEDULERS = ("warmup_cosine",)


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019): every k steps pull slow weights alpha of the way to the fast ones.

    Wraps an inner optimiser; state_dict carries both so a resumed run continues exactly.
    """

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"lookahead: expected k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.inner = inner
        self.k, self.alpha = k, alpha
        self.defaults = inner.defaults
        self.state = defaultdict(dict)  # slow weights per parameter
        self._steps = 0

    @property
    def param_groups(self) -> list[dict]:
        # the inner optimiser's live list: its load_state_dict replaces the list object
        return self.inner.param_groups

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


def _opt(cfg, name: str, default):
    """A config key that not every method's config has (local learning and StreamingCNN use their own)."""
    return getattr(cfg, name, default)


def split_no_decay(params: list[nn.Parameter] | list[dict]) -> list[dict]:
    """Each group as two: >= 2-D weights (keep the group's decay) and biases / 1-D parameters (decay 0)."""
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": list(params)}]
    out = []
    for g in groups:
        ps = list(g["params"])
        decay = [p for p in ps if p.ndim > 1]
        plain = [p for p in ps if p.ndim <= 1]
        if decay:
            out.append({**g, "params": decay})
        if plain:
            out.append({**g, "params": plain, "weight_decay": 0.0})
    return out


def build_optimizer(params: list[nn.Parameter] | list[dict], cfg) -> torch.optim.Optimizer:
    """One optimiser over `params` (tensors or param-group dicts with their own lr); see the module docstring."""
    name = cfg.optimizer
    if _opt(cfg, "no_decay_1d", False):
        params = split_no_decay(params)
    decoupled = bool(_opt(cfg, "decoupled_weight_decay", False))
    if name == "adam":
        if decoupled:
            return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if name == "radam_lookahead":
        inner = torch.optim.RAdam(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            decoupled_weight_decay=decoupled,
        )
        return Lookahead(inner)
    raise ConfigError(f"optimizer: unknown value {name!r}; expected adam, adamw, sgd or radam_lookahead")


MOMENTUM_DECAYS = ("none", "demon")


def demon(beta0: float, total: int) -> np.ndarray:
    """(total,) DEMON momentum of iterations 0..total-1: beta0 (1 - t/T) / ((1 - beta0) + beta0 (1 - t/T))."""
    if total < 1:
        raise ConfigError(f"momentum_decay demon: expected at least one iteration, got {total}")
    left = 1.0 - np.arange(total) / total  # (total,) 1 - t/T
    return beta0 * left / ((1.0 - beta0) + beta0 * left)


def warmup_cosine(base: float, final: float, total: int, warmup: int) -> np.ndarray:
    """(total,) values: linear 0 -> base over `warmup` iterations (base at the last), then cosine base -> final."""
    if total < 1:
        raise ConfigError(f"schedule: expected at least one iteration, got {total}")
    warmup = min(max(warmup, 0), total)
    ramp = np.linspace(0.0, base, warmup) if warmup else np.zeros(0)
    rest = total - warmup
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * np.arange(rest) / max(rest, 1)))
    return np.concatenate([ramp, cosine])


class Schedule:
    """The lr / weight-decay schedule of one optimiser: `step_iteration()` per step, `step(val_loss)` per epoch.

    `epoch_inner` is a torch epoch scheduler (or the plateau wrapper) or None;
    `lr_table` / `wd_table` are per-iteration values (lr per group; wd for the
    groups whose initial decay is non-zero) or None.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epoch_inner=None,
        lr_table: list[np.ndarray] | None = None,
        wd_table: np.ndarray | None = None,
        momentum_table: list[np.ndarray] | None = None,
    ):
        self.optimizer = optimizer
        self.epoch_inner = epoch_inner
        self.lr_table, self.wd_table = lr_table, wd_table
        self.momentum_table = momentum_table  # per group: Adam's beta1 or SGD's momentum per iteration
        # which groups the weight-decay ramp drives: the decaying ones, fixed at construction
        self.wd_groups = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0.0) > 0]
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        """Set lr / weight decay of iteration `self.iteration` (the last value holds past the end)."""
        groups = self.optimizer.param_groups
        if self.lr_table is not None:
            for g, table in zip(groups, self.lr_table, strict=True):
                g["lr"] = float(table[min(self.iteration, len(table) - 1)])
        if self.wd_table is not None:
            for i in self.wd_groups:
                groups[i]["weight_decay"] = float(self.wd_table[min(self.iteration, len(self.wd_table) - 1)])
        if self.momentum_table is not None:
            for g, table in zip(groups, self.momentum_table, strict=True):
                beta = float(table[min(self.iteration, len(table) - 1)])
                if "betas" in g:
                    g["betas"] = (beta, g["betas"][1])
                else:
                    g["momentum"] = beta

    def step_iteration(self) -> None:
        """Call after every optimiser step: moves to the next iteration's values (no-op for epoch schedules)."""
        self.iteration += 1
        self._apply()

    def step(self, val_loss: float | None = None) -> None:
        """Call once at the end of every epoch (no-op for per-iteration schedules)."""
        if isinstance(self.epoch_inner, _Plateau):
            self.epoch_inner.step(val_loss)
        elif self.epoch_inner is not None:
            self.epoch_inner.step()

    def state_dict(self) -> dict:
        inner = self.epoch_inner.state_dict() if self.epoch_inner is not None else {}
        return {"iteration": self.iteration, "epoch": inner}

    def load_state_dict(self, state: dict) -> None:
        if "iteration" not in state:  # a checkpoint from before per-iteration schedules: the epoch state alone
            state = {"iteration": 0, "epoch": state}
        if self.epoch_inner is not None:
            self.epoch_inner.load_state_dict(state["epoch"])
        self.iteration = int(state["iteration"])
        if self.lr_table is not None or self.wd_table is not None or self.momentum_table is not None:
            self._apply()


class _Plateau:
    """ReduceLROnPlateau driven by the validation loss (non-finite losses count as no improvement)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg):
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.step_gamma, patience=cfg.plateau_patience
        )

    def step(self, val_loss: float | None = None) -> None:
        self.inner.step(val_loss if val_loss is not None and math.isfinite(val_loss) else float("inf"))

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, iters_per_epoch: int | None = None) -> Schedule:
    """The config's schedule over `optimizer`; `iters_per_epoch` (optimiser steps per epoch) for per-iteration ones."""
    opt = optimizer.inner if isinstance(optimizer, Lookahead) else optimizer
    name = cfg.scheduler
    wd_end = _opt(cfg, "weight_decay_end", None)
    decay = _opt(cfg, "momentum_decay", "none")
    if decay not in MOMENTUM_DECAYS:
        raise ConfigError(f"momentum_decay: unknown value {decay!r}; expected one of {list(MOMENTUM_DECAYS)}")
    per_iteration = name in ITERATION_SCHEDULERS or wd_end is not None or decay != "none"
    if per_iteration and (iters_per_epoch is None or iters_per_epoch < 1):
        raise ConfigError(
            f"scheduler {name!r} / weight_decay_end: per-iteration schedules need iters_per_epoch >= 1, "
            f"got {iters_per_epoch!r}"
        )
    total = max(cfg.epochs, 1) * iters_per_epoch if per_iteration else 0
    epoch_inner, lr_table, wd_table = None, None, None
    if name == "none":
        pass
    elif name == "cosine":
        epoch_inner = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.min_lr)
    elif name == "step":
        epoch_inner = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(cfg.step_milestones), gamma=cfg.step_gamma
        )
    elif name == "exponential":
        epoch_inner = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.step_gamma)
    elif name == "plateau":
        epoch_inner = _Plateau(opt, cfg)
    elif name == "warmup_cosine":
        warmup = int(round(_opt(cfg, "warmup_epochs", 0) * iters_per_epoch))
        # each group's own base lr ("initial_lr": unchanged by a schedule built earlier on this optimiser)
        lr_table = [
            warmup_cosine(g.setdefault("initial_lr", g["lr"]), cfg.min_lr, total, warmup) for g in opt.param_groups
        ]
    else:
        raise ConfigError(
            f"scheduler: unknown value {name!r}; expected one of {list(EPOCH_SCHEDULERS + ITERATION_SCHEDULERS)}"
        )
    if wd_end is not None:
        wd_table = warmup_cosine(cfg.weight_decay, float(wd_end), total, 0)
    momentum_table = None
    if decay == "demon":  # each group's initial momentum ("initial_momentum": unchanged by a rebuilt schedule)
        momentum_table = []
        for g in opt.param_groups:
            if "betas" not in g and "momentum" not in g:
                raise ConfigError(f"momentum_decay demon: optimizer {cfg.optimizer!r} has no momentum to decay")
            beta0 = g.setdefault("initial_momentum", g["betas"][0] if "betas" in g else g["momentum"])
            momentum_table.append(demon(beta0, total))
    return Schedule(opt, epoch_inner, lr_table, wd_table, momentum_table)
