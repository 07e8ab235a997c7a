"""What the training loop needs from a whole-image learner (`WholeImageLearner`), and its state helpers."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from slidetrain.errors import ConfigError


def grads_of(net: nn.Module) -> dict[str, Tensor]:
    """Pending (accumulated, not yet stepped) gradients by parameter name, for an exact resume."""
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def load_grads(net: nn.Module, grads: dict[str, Tensor]) -> None:
    for name, p in net.named_parameters():
        p.grad = grads[name].to(p.device) if name in grads else None


class WholeImageLearner(abc.ABC):
    """What the training loop needs from a whole-image learner.

    - `train_slide(image, label)`: forward + backward for one (3, H, W)
      normalised slide; gradients ACCUMULATE (each loss scaled by
      1/accumulation). Returns float losses ({"m1_ce", "m1_rfr", ...,
      "final_ce", "loss"} for local learning) plus "image_h", "image_w"
      (the size trained on) and "oom_crops".
    - `step()`: optimiser step(s) + zero_grad; called every `accumulation`
      slides of an epoch (no extra step at its end: the rest carries over).
    - `calibrate_batchnorm(images)`: (learners whose config has
      `calibrate_bn`) BatchNorm statistics from the normalised training
      slides, once before the first epoch.
    - `end_epoch(epoch, val_loss)`: schedulers (and schedule stages);
      epoch counts from 0.
    - `predict(image)`: (C,) class probabilities (on the CPU) from the final head.
    - `state_dict()` / `load_state_dict()`: everything needed for an exact
      resume (model, optimisers, schedulers, schedule position, RNG of the
      learner); the loop restores torch's global RNG (dropout) itself.
    """

    cfg: Any

    @abc.abstractmethod
    def __init__(self, n_classes: int, cfg: Any, device: torch.device | str = "cpu"): ...

    @abc.abstractmethod
    def train_slide(self, image: Tensor, label: int) -> dict[str, float]: ...

    @abc.abstractmethod
    def step(self) -> None: ...

    @abc.abstractmethod
    def end_epoch(self, epoch: int, val_loss: float | None) -> None: ...

    @abc.abstractmethod
    def predict(self, image: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    #: keys of `state_dict` that only training needs (optimiser moments, schedule, pending gradients)
    TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "generator", "grads", "scaler")

    def weights_state_dict(self) -> dict:
        """`state_dict` without what only training needs: what prediction loads (`load_weights`).

        The selected epoch's state and model.pt keep this; with Adam's two moments and the pending
        gradients the full state is about four times the weights, and copying and writing it every
        epoch cost ~8 s per epoch of a ResNet34 learner on this CPU."""
        return {k: v for k, v in self.state_dict().items() if k not in self.TRAINING_ONLY_KEYS}

    @abc.abstractmethod
    def load_weights(self, state: dict) -> None:
        """Load a `weights_state_dict` (or a full `state_dict`) for prediction."""

    def _check_learner_tag(self, state: dict) -> None:
        """A state carries its learner's class name ("learner"); refuse one written by another learner."""
        if state.get("learner") != type(self).__name__:
            raise ConfigError(f"checkpoint: written by {state.get('learner')!r}, cannot resume a {type(self).__name__}")
