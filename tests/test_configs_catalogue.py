"""The torch-free method table (slidetrain.configs) mirrors the model and learner registries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slidetrain.configs import METHODS, check_method_config, image_methods
from slidetrain.configs.image import STREAM_TILE_MODES
from slidetrain.errors import ConfigError
from slidetrain.models import REGISTRY
from slidetrain.partitioned import TILE_MODES
from slidetrain.train.wholeimage.registry import LEARNERS, whole_image_methods


def test_every_registered_method_has_its_line_with_the_same_facts():
    learners = set(whole_image_methods())  # imports the learner modules (StreamingCNN)
    assert set(METHODS) == set(REGISTRY) | learners
    for name, entry in REGISTRY.items():
        info = METHODS[name]
        assert (info.trainer, info.config_cls, info.binary_only, info.has_attention) == (
            "mil",
            entry.config_cls,
            entry.binary_only,
            entry.model_cls.has_attention,
        ), name
    for name in learners:
        info, spec = METHODS[name], LEARNERS[name]
        assert (info.trainer, info.config_cls, info.preset) == ("image", spec.config_cls, spec.preset), name
    assert image_methods() == sorted(learners)
    assert STREAM_TILE_MODES == TILE_MODES


def test_the_table_and_the_configs_import_no_torch():
    code = "import sys, slidetrain.configs; sys.exit('torch' in sys.modules or 'numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bad_blocks_are_errors_naming_the_key():
    assert check_method_config("local_k8", {"epochs": 3}).K == 8
    assert check_method_config("gma", {"lr": 1e-3}).lr == 1e-3
    with pytest.raises(ConfigError, match=r"methods\.abmil: unknown key\(s\) \['lrr'\]"):
        check_method_config("abmil", {"lrr": 1})
    with pytest.raises(ConfigError, match=r"methods\.local_k4\.K: fixed to 4"):
        check_method_config("local_k4", {"K": 8})
    with pytest.raises(ConfigError, match=r"methods\.image_e2e\.checkpointing: expected one of"):
        check_method_config("image_e2e", {"checkpointing": "all"})
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        check_method_config("nope", {})


def test_the_tile_bag_block_is_checked_without_torch_and_knows_the_encoders():
    from slidetrain.configs.tilebag import FOUNDATION_ENCODERS, RESNET_ENCODERS, tilebag_config
    from slidetrain.models.encoders import ENCODER_NAMES as BUILT
    from slidetrain.models.foundation import FOUNDATION_NAMES

    assert RESNET_ENCODERS == BUILT and FOUNDATION_ENCODERS == FOUNDATION_NAMES
    assert tilebag_config({"k": 8, "backbone": "resnet18"}).k == 8
    with pytest.raises(ConfigError, match=r"methods\.tilebag: unknown key\(s\) \['kk'\]"):
        tilebag_config({"kk": 8})
    code = "import sys, slidetrain.configs.tilebag; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
