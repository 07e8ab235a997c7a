"""How one tile bag's forward and backward run: the executor interface and its implementations.

The interface (what `offload` and `distributed` implement too)::

    result = executor.step(tiles, encoder, aggregator, label, loss_fn, ctx)

- `tiles`: (K, 3, P, P) float32, the slide's bag, already normalised, on any device (the
  executor moves it where its encoder runs).
- `encoder`: nn.Module, (B, 3, P, P) -> (B, D). `aggregator`: a registry MILModel, (K, D) ->
  MILOutput. `label`: 0-d int64 tensor. `loss_fn(out, label) -> 0-d tensor` (the aggregator's
  slide loss with any class weight bound).
- `ctx` (StepContext): `loss_scale` (1 / accumulation: the executor backpropagates
  loss * loss_scale, so gradients of several slides ADD UP in `.grad`), `scaler` (the trainer's
  torch.amp.GradScaler, or None: when given, the executor backpropagates scaler.scale(...); the
  trainer unscales and steps), `autocast` (a zero-argument callable returning the autocast
  context, or a null context without AMP), `train_encoder` (False = `encoder: frozen`: no
  encoder graph, no encoder backward; the trainer has put the encoder in eval mode).
- The executor neither zeroes gradients nor steps the optimiser: the trainer owns both.
- Returns StepResult(loss: float, the unscaled slide loss; output: the MILOutput, detached;
  n_tiles). After `step`, every parameter's `.grad` must hold what `plain` leaves there for the
  same bag, up to floating-point reordering: that is what each executor's equivalence test checks.

Implementations:
- `plain`: one autograd graph through encoder and aggregator on one device (Campanella's
  "single" rows; the reference for all others).
- `two_stage`: encoder forward, features detached; aggregator forward and backward to the
  feature gradient g = dL/df; then the pseudo-loss sum(f * g) backpropagated through the encoder.
  By the chain rule this leaves the same gradients as `plain`; it is the single-process core of
  `distributed` (issue 14), where f is gathered to the aggregator rank, g scattered back, and each
  of N DDP ranks backpropagates N * sum(f_r * g_r) because DDP averages gradients over ranks.

Register an executor with `@register_executor("name")`; `build_executor(name)` is the factory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from slidetrain.errors import ConfigError
from slidetrain.models.base import MILModel, MILOutput

LossFn = Callable[[MILOutput, Tensor], Tensor]


@dataclass
class StepContext:
    loss_scale: float = 1.0  # 1 / accumulation
    scaler: torch.amp.GradScaler | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    train_encoder: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class StepResult:
    loss: float
    output: MILOutput
    n_tiles: int


def _backward(loss: Tensor, ctx: StepContext) -> None:
    scaled = loss * ctx.loss_scale
    (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()


def _detached(out: MILOutput) -> MILOutput:
    return MILOutput(
        logits=out.logits.detach(),
        attention=None if out.attention is None else out.attention.detach(),
        extras={k: v.detach() if isinstance(v, Tensor) else v for k, v in out.extras.items()},
    )


def encode(encoder: nn.Module, tiles: Tensor, ctx: StepContext) -> Tensor:
    """(K, 3, P, P) -> (K, D) features (float32 after AMP's half precision); no graph when frozen."""
    tiles = tiles.to(ctx.device, non_blocking=True)
    grad = torch.enable_grad() if ctx.train_encoder else torch.no_grad()
    with grad, ctx.autocast():
        features = encoder(tiles)  # (K, D)
    return full_precision(features)


def full_precision(t: Tensor) -> Tensor:
    """AMP's half-precision output back to torch's default dtype (float32, or float64 in checks)."""
    return t.to(torch.get_default_dtype()) if t.dtype in (torch.float16, torch.bfloat16) else t


class Executor:
    """Base class; see the module docstring for the contract of `step`."""

    name = "?"

    def step(
        self, tiles: Tensor, encoder: nn.Module, aggregator: MILModel, label: Tensor, loss_fn: LossFn, ctx: StepContext
    ) -> StepResult:
        raise NotImplementedError


EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str):
    def wrap(cls: type[Executor]) -> type[Executor]:
        if name in EXECUTORS:
            raise ValueError(f"executor {name!r} registered twice")
        cls.name = name
        EXECUTORS[name] = cls
        return cls

    return wrap


def build_executor(name: str, **kwargs) -> Executor:
    if name not in EXECUTORS:
        raise ConfigError(f"executor: unknown value {name!r}; expected one of {sorted(EXECUTORS)}")
    return EXECUTORS[name](**kwargs)


@register_executor("plain")
class PlainExecutor(Executor):
    """The whole bag through encoder and aggregator in one autograd graph."""

    def step(self, tiles, encoder, aggregator, label, loss_fn, ctx):
        features = encode(encoder, tiles, ctx)  # (K, D)
        with ctx.autocast():
            out = aggregator(features)
            loss = loss_fn(out, label.to(ctx.device))
        _backward(loss, ctx)
        return StepResult(float(loss.detach()), _detached(out), len(tiles))


@register_executor("two_stage")
class TwoStageExecutor(Executor):
    """Aggregator backward to the feature gradient g, then sum(f * g) backward through the encoder.

    `pseudo_loss_factor` is 1 here; the distributed executor uses N (DDP averages N ranks).
    """

    def __init__(self, pseudo_loss_factor: float = 1.0):
        self.pseudo_loss_factor = pseudo_loss_factor

    def step(self, tiles, encoder, aggregator, label, loss_fn, ctx):
        features = encode(encoder, tiles, ctx)  # (K, D), graph back to the encoder when trained
        leaf = features.detach().requires_grad_(ctx.train_encoder)  # (K, D), the aggregator's input
        with ctx.autocast():
            out = aggregator(leaf)
            loss = loss_fn(out, label.to(ctx.device))
        _backward(loss, ctx)  # aggregator .grad and leaf.grad = g (already loss- and AMP-scaled)
        if ctx.train_encoder:
            g = leaf.grad  # (K, D)
            pseudo = (features * g).sum() * self.pseudo_loss_factor
            pseudo.backward()  # d(pseudo)/d(theta_enc) = sum_k g_k df_k/dtheta = dL/dtheta (scaled alike)
        return StepResult(float(loss.detach()), _detached(out), len(tiles))


from slidetrain.train.tilebag import offload_executor as _offload_executor  # noqa: E402, F401  registers "offload"
