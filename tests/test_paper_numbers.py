"""The papers' numbers have one source, src/slidetrain/paper/data/*.csv: none is typed again in src/ (code,
comments or help text), and the configs that repeat one agree with the CSV."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slidetrain.paper.reference import paper_split_counts

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = REPO / "src" / "slidetrain" / "paper" / "data"
#: row keys, not reported numbers (the K a row stands for is also a config value, e.g. k_sweep)
KEY_COLUMNS = {"k"}


def distinctive(text: str) -> bool:
    """A number that is a paper's and not a common constant: an integer of 200 or more, a decimal of four
    significant digits (0.8785, 17.89) or one of three from 10 up (68.0, 74.4). 2, 64, 150, 0.5 or 2.54
    (cm per inch) are in code for other reasons."""
    digits = text.replace(".", "").lstrip("0")
    if "." not in text:
        return int(text) >= 200
    return len(digits) >= 4 or (len(digits) >= 3 and float(text) >= 10)


def paper_numbers() -> dict[str, str]:
    """Every distinctive number in the paper CSVs, as written there -> the file and column it is from."""
    found = {}
    for path in sorted(PAPER_DATA.glob("*.csv")):
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        for column in table.columns.difference(sorted(KEY_COLUMNS)):
            for cell in table[column]:
                cell = cell.strip().lstrip("<")
                if re.fullmatch(r"\d+(\.\d+)?", cell) and distinctive(cell):
                    found.setdefault(cell, f"{path.name}:{column}")
    return found


def number_pattern(number: str) -> re.Pattern:
    """The number as a token, also with a thousands separator (1848, 1,848, 1_848), not inside a longer one."""
    if "." in number:
        body = re.escape(number)
    else:
        n = int(number)
        body = "|".join(re.escape(s) for s in {f"{n}", f"{n:,}", f"{n:_}"})
    return re.compile(rf"(?<![\w.,])(?:{body})(?![\w]|[.,]\d)")


def typed_numbers(root: Path, numbers: dict[str, str]) -> list[str]:
    """file:line: number (source) for each paper number typed in a text file under `root` outside the CSVs."""
    patterns = {n: number_pattern(n) for n in numbers}
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in {".py", ".smk", ".yaml", ".rst", ".md", ".json", ".txt"}:
            continue
        if PAPER_DATA in path.parents or "egg-info" in str(path):
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for number, pattern in patterns.items():
                if pattern.search(line):
                    hits.append(f"{path.relative_to(root.parent)}:{lineno}: {number} ({numbers[number]})")
    return hits


def test_the_known_paper_numbers_are_in_the_csvs():
    numbers = paper_numbers()
    # the issue's examples: Campanella et al.'s max tiles and the local-learning paper's split counts
    assert {"840", "1848", "528", "728"} <= set(numbers)
    assert {str(c) for c in paper_split_counts("TCGA-NSCLC")} - {"166"} <= set(numbers)
    assert {"68.0", "2.6", "0.8785"} & set(numbers) == {"68.0", "0.8785"}  # 2.6: too common to look for


def test_no_paper_number_is_typed_in_src_outside_the_paper_csvs():
    hits = typed_numbers(REPO / "src", paper_numbers())
    assert not hits, "paper numbers typed outside src/slidetrain/paper/data/ (read them from the CSV):\n" + "\n".join(
        hits
    )


@pytest.mark.parametrize(
    "written", ["limit = 1848", "tiles = 1_848  # fp16", "'1,848 tiles'", "(663, 166, 214)", "acc = 0.8785"]
)
def test_the_scan_finds_a_typed_number(tmp_path, written):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(f"x = 1\n{written}\n")
    assert typed_numbers(tmp_path / "src", paper_numbers())


@pytest.mark.parametrize("written", ["n = 18480", "version 1.8480", "seed = 840_000", "x = 0.87851", "pat_1848"])
def test_the_scan_ignores_a_number_inside_another(tmp_path, written):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(f"{written}\n")
    assert not typed_numbers(tmp_path / "src", paper_numbers())


def test_the_local_learning_config_split_counts_are_the_papers():
    config = yaml.safe_load((REPO / "config" / "local_learning.yaml").read_text())
    for dataset, block in config["datasets"].items():
        assert tuple(block["split"]["counts"]) == paper_split_counts(block["paper_name"]), dataset
