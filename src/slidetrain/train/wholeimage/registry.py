"""Whole-image methods by name: `build_learner("local_k4", n_classes, params)` and `register_learner`.

Other whole-image learners (StreamingCNN) plug in with `register_learner` from
a module listed in `LEARNER_MODULES`, imported on first use. The torch-free
method table (slidetrain.configs) mirrors these entries for the workflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slidetrain.configs.image import ConfigKeyError, ImageE2EConfig, LocalConfig, build_config
from slidetrain.errors import ConfigError
from slidetrain.train.wholeimage.image_e2e_learner import ImageE2ELearner
from slidetrain.train.wholeimage.interface import WholeImageLearner
from slidetrain.train.wholeimage.local_learner import LocalLearner


@dataclass(frozen=True)
class LearnerSpec:
    config_cls: type
    learner_cls: Callable[..., WholeImageLearner]  # (n_classes, cfg, device) -> learner
    preset: dict[str, Any] = field(default_factory=dict)  # keys fixed by the method name


#: method name -> learner; `register_learner` adds one
LEARNERS: dict[str, LearnerSpec] = {}
#: modules imported on the first `build_learner` call, so their `register_learner`
#: calls run (e.g. "slidetrain.models.streamingcnn" for StreamingCNN)
LEARNER_MODULES: list[str] = ["slidetrain.models.streamingcnn"]


def register_learner(
    method: str,
    config_cls: type,
    learner_cls: Callable[..., WholeImageLearner],
    preset: dict[str, Any] | None = None,
) -> None:
    if method in LEARNERS:
        raise ValueError(f"learner {method!r} registered twice")
    LEARNERS[method] = LearnerSpec(config_cls, learner_cls, dict(preset or {}))


register_learner("local_k4", LocalConfig, LocalLearner, {"K": 4})
register_learner("local_k8", LocalConfig, LocalLearner, {"K": 8})
register_learner("local_k4_norfr", LocalConfig, LocalLearner, {"K": 4, "rfr": False, "alpha": 0.0})
register_learner("local_k8_norfr", LocalConfig, LocalLearner, {"K": 8, "rfr": False, "alpha": 0.0})
register_learner("image_e2e", ImageE2EConfig, ImageE2ELearner)


def _load_learner_modules() -> None:
    for name in LEARNER_MODULES:
        importlib.import_module(name)


def whole_image_methods() -> list[str]:
    """Every registered whole-image method (the workflow routes these to the image trainer)."""
    _load_learner_modules()
    return sorted(LEARNERS)


def learner_config(method: str, params: dict | None = None) -> Any:
    """The validated config of `method`: defaults, then the method's preset, then `params`."""
    _load_learner_modules()
    if method not in LEARNERS:
        raise ConfigError(f"methods: unknown whole-image method {method!r}; expected one of {sorted(LEARNERS)}")
    spec = LEARNERS[method]
    return build_config(spec.config_cls, spec.preset, params, f"methods.{method}")


def build_learner(
    method: str, n_classes: int, params: dict | None = None, device: torch.device | str = "cpu"
) -> WholeImageLearner:
    """A ready learner for `method` (params override the reference defaults)."""
    cfg = learner_config(method, params)
    try:
        return LEARNERS[method].learner_cls(n_classes, cfg, torch.device(device))
    except ConfigKeyError as err:
        raise ConfigError(f"methods.{method}.{err.key}: {err.detail}") from None
