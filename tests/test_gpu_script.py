"""The GPU script rehearsed on CPU (--tiny), so that it works the first time a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_every_section_in_tiny_mode(tmp_path):
    from slidetrain.bench.gpu import SECTIONS

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), str(tmp_path), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [e["section"] for e in summary] == [name for name, _, _ in SECTIONS]
    for entry in summary:
        assert entry["status"] != "failed", entry
        assert (tmp_path / f"{entry['section']}.csv").exists(), entry["section"]
    device = pd.read_csv(tmp_path / "device.csv")
    assert device.loc[0, "device"] == "cpu"
