"""The papers' reported numbers: read from paper/data/*.csv and looked up strictly.

These CSVs are the one source of every paper number in the package (tests/test_paper_numbers.py
keeps it so). A lookup that finds no row is an error naming the table, the key and its value: a
typo in a configured paper name must stop a table, not leave its paper column blank.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import TYPE_CHECKING

from slidetrain.errors import ConfigError

if TYPE_CHECKING:  # pandas is imported when a table is read, not when the command line is parsed
    import pandas as pd

#: Only an empty cell is missing. pandas' default NA list would also turn the papers' own word
#: "NA" (Campanella et al.'s Max-pool MIL row has embedding "NA") into NaN, which then matches nothing.
MISSING_CELLS = [""]


def paper_table(name: str) -> pd.DataFrame:
    """One table of paper/data/ by its file stem (e.g. "local_table1"); ConfigError naming an unknown one."""
    import pandas as pd

    path = resources.files("slidetrain.paper").joinpath("data", f"{name}.csv")
    if not path.is_file():
        known = sorted(
            p.name.removesuffix(".csv")
            for p in resources.files("slidetrain.paper").joinpath("data").iterdir()
            if p.name.endswith(".csv")
        )
        raise ConfigError(f"paper table {name!r} does not exist; expected one of {known}")
    with path.open() as f:
        return pd.read_csv(f, keep_default_na=False, na_values=MISSING_CELLS)


def require_value(table: pd.DataFrame, table_name: str, column: str, value: object, what: str) -> None:
    """ConfigError unless `value` occurs in `column` of a paper table; `what` says who asked (a config key)."""
    if value not in set(table[column]):
        known = sorted(
            {_shown(v) for v in table[column].dropna()}, key=lambda v: (len(v), v) if v.isdigit() else (0, v)
        )
        raise ConfigError(
            f"{what} = {value!r}: the paper's {table_name} has no {column} {value!r}; expected one of {known}"
        )


def _shown(value: object) -> str:
    """A cell as the paper writes it: 700, not 700.0 (a column with empty cells is read as float)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def paper_row(table: pd.DataFrame, table_name: str, what: str, **keys: object) -> pd.Series:
    """The one row of a paper table whose columns equal `keys`; ConfigError naming them when none or several."""
    match = table
    for column, value in keys.items():
        match = match[match[column] == value]
    if len(match) != 1:
        wanted = ", ".join(f"{c}={v!r}" for c, v in keys.items())
        found = "no row" if match.empty else f"{len(match)} rows"
        raise ConfigError(f"{what}: the paper's {table_name} has {found} with {wanted}; expected exactly one")
    return match.iloc[0]


def paper_split_counts(paper_name: str) -> tuple[int, int, int]:
    """Slides per part (train, val, test) of a local-learning dataset by paper name (paper/data/local_splits.csv)."""
    table = paper_table("local_splits")
    require_value(table, "local_splits", "dataset", paper_name, "paper_name")
    row = paper_row(table, "local_splits", "paper_name", dataset=paper_name)
    return int(row.train), int(row.val), int(row.test)


#: our encoder and precision names -> tilebag_memory.csv's (the paper measured ResNet50 and ViT-base only)
MEMORY_ENCODERS = {"resnet50": "ResNet50", "vit_b_16": "ViT-base"}
MEMORY_PRECISIONS = {"fp32": "fp32", "amp": "amp-fp16"}


def paper_tiles_per_gb(encoder: str, precision: str, paper: pd.DataFrame | None = None) -> float:
    """The paper's max tiles per GB of its GPU for one of our (encoder, precision); NaN for an encoder it
    did not measure. The GPU's memory is in the column's name (max_tiles_h100_80gb)."""
    if encoder not in MEMORY_ENCODERS:
        return float("nan")
    paper = paper_table("tilebag_memory") if paper is None else paper
    if precision not in MEMORY_PRECISIONS:
        raise ConfigError(f"tilebag_memory: precision {precision!r}; expected one of {sorted(MEMORY_PRECISIONS)}")
    column = next(c for c in paper.columns if re.fullmatch(r"max_tiles_\w+?_(\d+)gb", c))
    gb = float(re.fullmatch(r"max_tiles_\w+?_(\d+)gb", column).group(1))
    row = paper_row(
        paper,
        "tilebag_memory",
        f"max tiles of {encoder} {precision}",
        encoder=MEMORY_ENCODERS[encoder],
        precision=MEMORY_PRECISIONS[precision],
    )
    return float(row[column]) / gb


def external_tiles_per_s(encoder: str, tool: str) -> float:
    """Tiles per second other tools' users report for a foundation model's feature extraction
    (paper/data/external_throughput.csv; e.g. UNI2-h in TRIDENT), beside the GPU script's own."""
    table = paper_table("external_throughput")
    row = paper_row(
        table, "external_throughput", f"reported tiles/s of {encoder} in {tool}", encoder=encoder, tool=tool
    )
    return float(row.value)
