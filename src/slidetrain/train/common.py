"""What every training strategy shares: seeding, provenance, checkpoints, history.

A checkpoint is written atomically at the end of every epoch and carries the
RNG states, so a run killed at any point resumes from its last finished epoch
and ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidetrain.configs.image import SELECTION_METRICS  # noqa: F401 (re-exported)
from slidetrain.errors import SplitError
from slidetrain.io import atomic_path, write_json


@contextlib.contextmanager
def default_dtype(name: str) -> Iterator[None]:
    """torch's default dtype set to `name` (float32 | float64) inside, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    """The commit of the code that ran (with '+dirty' if the tree had changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_provenance(path: Path, method: str, cfg, seed: int, extra: dict | None = None) -> None:
    """The resolved config, seed and git commit beside the model."""
    write_json(
        path,
        {
            "method": method,
            "config": asdict(cfg) if is_dataclass(cfg) else dict(cfg),
            "seed": seed,
            "git_commit": git_commit(),
            "torch": torch.__version__,
            **(extra or {}),
        },
    )


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def after_epoch_checkpoint(epochs_done: int) -> None:
    """Runs once the checkpoint of `epochs_done` epochs is on disk (every trainer calls it); a no-op.

    An extension point, looked up at call time: the tests replace it (tests/_entry.py) to kill a
    run right there, as an interrupted job would be."""


def write_history(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Loss-like metrics improve downwards, scores upwards; NaN never improves."""
    if value != value:  # NaN
        return False
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def config_hash(method: str, cfg, seed: int, split_csv: Path) -> str:
    """Identifies what a checkpoint was trained for, so a changed config never resumes a stale run."""
    blob = json.dumps(
        {"method": method, "cfg": asdict(cfg), "seed": seed, "split": Path(split_csv).read_text()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def part_slides(split: pd.DataFrame, part: str, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Slide ids and class indices (in `class_names` order) of one part of a split."""
    rows = split[split.part == part]
    if rows.empty:
        raise SplitError(f"split has no slides in part {part!r}")
    lookup = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(rows.label) - set(lookup))
    if unknown:
        raise SplitError(f"part {part!r}: label(s) {unknown} are not among the classes {list(class_names)}")
    return rows.slide_id.tolist(), [lookup[x] for x in rows.label]


def patient_of(split: pd.DataFrame) -> dict[str, str]:
    """slide_id -> patient_id of a split: what the bootstrap CIs resample (patients, not slides)."""
    return dict(zip(split.slide_id.astype(str), split.patient_id.astype(str), strict=True))


def predictions_table(
    slide_ids: Sequence[str], labels: Sequence[int], probs: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """slide_id, label, predicted, prob_<class>...: the predictions CSV every evaluation writes."""
    pred = pd.DataFrame({"slide_id": list(slide_ids), "label": [class_names[i] for i in labels]})
    pred["predicted"] = [class_names[i] for i in probs.argmax(1)]
    for i, c in enumerate(class_names):
        pred[f"prob_{c}"] = probs[:, i]  # probs: (N, C)
    return pred
