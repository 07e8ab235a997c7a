"""MIL training throughput: one epoch per method over the same synthetic bags.

The bags are real files (the same h5 layout the pipeline writes) and the
epoch goes through `slidetrain train-mil`, so loading, batching and
validation are measured with the model, as a user's run would pay them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slidetrain.data.splits import write_split
from slidetrain.io import atomic_path
from slidetrain.wsi.features import write_features


def make_bench_bags(out_dir: Path, split_csv: Path, n_bags: int, n_instances: int, dim: int, seed: int = 0) -> None:
    """`n_bags` bags of (n_instances, dim) float32, two classes told apart by a few shifted instances."""
    rng = np.random.default_rng(seed)
    rows = []
    n_eval = max(2, n_bags // 100)
    for i in range(n_bags):
        label = i % 2
        x = rng.standard_normal((n_instances, dim), dtype=np.float32)  # (N, D)
        if label:
            x[: max(1, n_instances // 20), :8] += 2.0  # 5% of instances carry the evidence
        slide_id = f"bag_{i:05d}"
        write_features(Path(out_dir) / f"{slide_id}.h5", x, np.zeros((n_instances, 2), np.int64), {"seconds": 0.0})
        part = "val" if i < n_eval else ("test" if i < 2 * n_eval else "train")
        rows.append(
            {"slide_id": slide_id, "patient_id": slide_id, "label": ["negative", "positive"][label], "part": part}
        )
    write_split(pd.DataFrame(rows), split_csv)


def throughput_table(run_dirs: list[Path], benchmark_tsvs: list[Path], out_csv: Path) -> pd.DataFrame:
    """One row per method: training-epoch seconds (harness) and the whole job's seconds (Snakemake benchmark)."""
    rows = []
    for run_dir, bench in zip(run_dirs, benchmark_tsvs, strict=True):
        history = pd.read_csv(Path(run_dir) / "history.csv")
        job = pd.read_csv(bench, sep="\t")
        rows.append(
            {
                "method": Path(run_dir).name,  # results/bench/mil/{method}
                "epoch_s": float(history.seconds.iloc[0]),
                "job_s": float(job.s.iloc[0]),
                "max_rss_mb": float(job.max_rss.iloc[0]) if "max_rss" in job else np.nan,
            }
        )
    table = pd.DataFrame(rows).sort_values("epoch_s")
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.2f")
    return table
