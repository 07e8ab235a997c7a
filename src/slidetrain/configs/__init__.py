"""Every method the workflow routes, without importing torch: its trainer, config class and flags.

The Snakefile needs, at parse time, which trainer each `methods` block goes to (MIL on cached
features or whole-image), whether a method is binary-only or exports attention, and whether each
block is valid. The model and learner registries (slidetrain.models.REGISTRY,
slidetrain.train.wholeimage.registry.LEARNERS) hold the same facts but import torch and torchvision, which cost
~5 s of every `snakemake` call; this table is their torch-free mirror (tests/test_configs_catalogue.py
checks that the two agree, so a method added to a registry without a line here fails a test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slidetrain.configs import image, mil
from slidetrain.errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    trainer: str  # "mil" (cached features, slidetrain.train.mil) | "image" (whole-slide images)
    config_cls: type
    preset: dict[str, Any] = field(default_factory=dict)  # image methods: keys fixed by the name
    binary_only: bool = False  # a '/' row on multi-class datasets (MIL-RNN)
    has_attention: bool = False  # per-tile attention for heatmaps


_NO_RFR = {"rfr": False, "alpha": 0.0}

METHODS: dict[str, MethodInfo] = {
    "maxpool": MethodInfo("mil", mil.PoolingConfig),
    "meanpool": MethodInfo("mil", mil.PoolingConfig),
    "abmil": MethodInfo("mil", mil.ABMILConfig, has_attention=True),
    "gabmil": MethodInfo("mil", mil.ABMILConfig, has_attention=True),
    "gma": MethodInfo("mil", mil.GMAConfig, has_attention=True),
    "clam_sb": MethodInfo("mil", mil.CLAMConfig, has_attention=True),
    "clam_mb": MethodInfo("mil", mil.CLAMConfig, has_attention=True),
    "dsmil": MethodInfo("mil", mil.DSMILConfig, has_attention=True),
    "dtfd": MethodInfo("mil", mil.DTFDConfig, has_attention=True),
    "milrnn": MethodInfo("mil", mil.MILRNNConfig, binary_only=True),
    "transmil": MethodInfo("mil", mil.TransMILConfig, has_attention=True),
    "local_k4": MethodInfo("image", image.LocalConfig, {"K": 4}),
    "local_k8": MethodInfo("image", image.LocalConfig, {"K": 8}),
    "local_k4_norfr": MethodInfo("image", image.LocalConfig, {"K": 4, **_NO_RFR}),
    "local_k8_norfr": MethodInfo("image", image.LocalConfig, {"K": 8, **_NO_RFR}),
    "image_e2e": MethodInfo("image", image.ImageE2EConfig),
    "streamingcnn": MethodInfo("image", image.StreamingConfig),
}


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"methods: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def image_methods() -> list[str]:
    return sorted(n for n, m in METHODS.items() if m.trainer == "image")


def check_method_config(name: str, params: dict | None) -> object:
    """The validated config of `methods.<name>` (what its trainer will build), or a ConfigError."""
    info = method_info(name)
    where = f"methods.{name}"
    if info.trainer == "image":
        return image.build_config(info.config_cls, info.preset, params, where)
    return mil.config_from_dict(info.config_cls, params, where=where)
