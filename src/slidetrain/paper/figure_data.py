"""The numbers a figure plots, written as a CSV beside its PNG.

A PNG cannot be checked (its size says nothing about what it shows); the CSV can: every figure
writes one row per plotted point, in long form, so a test or a reader asserts on the series,
their number of points and their values. `y_low`/`y_high` carry a drawn band or error bar and
are empty where none is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.io import atomic_path

FIGURE_DATA_COLUMNS = ["panel", "series", "x", "y", "y_low", "y_high"]


def data_path_for(png: str | Path) -> Path:
    """Where a figure's data goes: the PNG's path with .csv (results/figures/x.png -> x.csv)."""
    return Path(png).with_suffix(".csv")


class FigureData:
    """Collects the plotted points panel by panel, then writes them in one CSV."""

    def __init__(self) -> None:
        self._frames: list[pd.DataFrame] = []

    def add(
        self,
        panel: str,
        series: str,
        x: Iterable,
        y: Iterable,
        y_low: Iterable | None = None,
        y_high: Iterable | None = None,
    ) -> None:
        x, y = list(x), np.asarray(list(y), dtype=float)
        if len(x) != len(y):
            raise ValueError(f"figure data {panel}/{series}: {len(x)} x values but {len(y)} y values")
        n = len(y)
        low = np.full(n, np.nan) if y_low is None else np.asarray(list(y_low), dtype=float)
        high = np.full(n, np.nan) if y_high is None else np.asarray(list(y_high), dtype=float)
        self._frames.append(
            pd.DataFrame(
                {"panel": panel, "series": series, "x": x, "y": y, "y_low": low, "y_high": high},
                columns=FIGURE_DATA_COLUMNS,
            )
        )

    def frame(self) -> pd.DataFrame:
        if not self._frames:
            return pd.DataFrame(columns=FIGURE_DATA_COLUMNS)
        return pd.concat(self._frames, ignore_index=True)

    def write(self, path: str | Path) -> pd.DataFrame:
        table = self.frame()
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        return table
