"""Layers point one way and test hooks stay in tests.

- `slidetrain.train` never imports `slidetrain.bench` (bench measures training, not the reverse);
- no production module reads a test-hook environment variable;
- `slidetrain --help` and every subcommand's `--help` show no test hook.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slidetrain.cli import build_parser

SRC = Path(__file__).resolve().parents[1] / "src" / "slidetrain"
HOOK_WORDS = re.compile(
    r"\bfaults?\b|\binject|stop[-_ ]after|pseudo[-_ ]loss|test[-_ ]hook|for the tests|tests:", re.IGNORECASE
)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_train_never_imports_bench():
    offenders = {
        str(p.relative_to(SRC)): sorted(m for m in _imported_modules(p) if m.startswith("slidetrain.bench"))
        for p in sorted((SRC / "train").rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_import_scan_sees_a_bench_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from slidetrain.bench.gpu import main\n    import slidetrain.bench.memory\n")
    assert {"slidetrain.bench.gpu", "slidetrain.bench.memory"} <= _imported_modules(bad)


@pytest.mark.parametrize(
    "env",
    [
        "SLIDETRAIN_STOP_AFTER_EPOCH",
        "SLIDETRAIN_RANK_FAULT",
        "SLIDETRAIN_PSEUDO_LOSS_FACTOR",
        "SLIDETRAIN_GPU_BENCH_FAULT",
    ],
)
def test_no_production_module_reads_a_test_hook(env):
    assert not [str(p) for p in SRC.rglob("*.py") if env in p.read_text()]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    return out.getvalue()


def test_every_subcommand_is_listed():
    assert len(_subcommands()) >= 40
    assert {"distributed-parallel", "train-tilebag", "tilebag-table1", "train-image"} <= set(_subcommands())


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_subcommand_help_shows_no_test_hook(name):
    text = _help([name, "--help"])
    assert name in text
    assert not HOOK_WORDS.search(text), HOOK_WORDS.search(text)[0]


def test_top_level_help_shows_no_test_hook():
    proc = subprocess.run(
        [sys.executable, "-m", "slidetrain.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "train-tilebag" in proc.stdout and not HOOK_WORDS.search(proc.stdout)
