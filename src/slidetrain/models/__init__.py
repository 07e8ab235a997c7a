"""Model registry: name -> (model class, config dataclass).

Adding a method = one model file with `@register(...)` + one import line
below + its config dataclass in slidetrain/configs/mil.py and its line in
`slidetrain.configs.METHODS` (the torch-free table the workflow validates
configs with at parse time; tests/test_configs_catalogue.py fails when the two
disagree) + one config block. `build_model` is the only factory the training
code uses, and the contract tests iterate over `REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from slidetrain.errors import ConfigError
from slidetrain.models.base import MILModel, MILOutput, TrainConfig, config_from_dict


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_cls: type[MILModel]
    config_cls: type[TrainConfig]
    binary_only: bool = False


REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type[TrainConfig], binary_only: bool = False) -> Callable:
    """Class decorator adding an aggregator to the registry under `name`."""

    def wrap(model_cls: type[MILModel]) -> type[MILModel]:
        if name in REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        REGISTRY[name] = ModelEntry(name, model_cls, config_cls, binary_only)
        return model_cls

    return wrap


def get_entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; expected one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def method_config(name: str, params: dict | None) -> TrainConfig:
    """The method's validated config (reference defaults + the config block's overrides)."""
    entry = get_entry(name)
    return config_from_dict(entry.config_cls, params, where=f"methods.{name}")


def build_model(name: str, in_dim: int, n_classes: int, cfg: TrainConfig) -> MILModel:
    entry = get_entry(name)
    if entry.binary_only and n_classes != 2:
        raise ConfigError(f"method {name!r} supports binary tasks only; this dataset has {n_classes} classes")
    return entry.model_cls(in_dim=in_dim, n_classes=n_classes, cfg=cfg)


def model_keys(cfg: TrainConfig) -> dict:
    """The architecture part of a config (for logging); everything not in TrainConfig."""
    base = {f.name for f in fields(TrainConfig)}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in base}


# One import per model file: importing registers the model.
from slidetrain.models import abmil, clam, dsmil, dtfd, gma, milrnn, pooling, transmil  # noqa: E402,F401

__all__ = ["REGISTRY", "MILModel", "MILOutput", "TrainConfig", "build_model", "get_entry", "method_config", "register"]
