"""Every module of the package imports in the environment the project's own install made.

An import that works only on one machine (a package installed by hand, not declared in
pyproject.toml) fails here, in CI's fresh virtual environment.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import slidetrain


def _all_modules() -> list[str]:
    names = [slidetrain.__name__]
    for info in pkgutil.walk_packages(slidetrain.__path__, prefix=f"{slidetrain.__name__}."):
        names.append(info.name)
    return sorted(names)


def test_the_walk_finds_the_package_layout():
    names = _all_modules()
    # One module per stage folder at least: a walk that found nothing would make the test below vacuous.
    for stage in ("wsi", "data", "models", "train", "partitioned", "evaluate", "paper", "bench"):
        assert any(n.startswith(f"slidetrain.{stage}.") for n in names), stage
    assert "slidetrain.cli" in names


@pytest.mark.parametrize("name", _all_modules())
def test_module_imports(name):
    importlib.import_module(name)
