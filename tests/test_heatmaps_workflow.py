"""The `heatmaps` target on a tiny config: one PNG + CSV per test slide of each attention method, the gallery."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slidetrain.wsi.synthetic import synthetic_sheet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config" / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_heatmaps_target_draws_every_test_slide(tmp_path):
    (tmp_path / "config" / "sheets").mkdir(parents=True)
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_config.yaml").read_text())
    config["table1"]["methods"] = ["maxpool", "abmil"]  # maxpool has no attention: no heatmaps for it
    config["methods"] = {m: config["methods"][m] for m in ("maxpool", "abmil", "local_k4")}
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    synthetic_sheet(12, seed=3).to_csv(tmp_path / "config" / "sheets" / "synthetic.tsv", sep="\t", index=False)
    snakemake(tmp_path, "heatmaps")
    out = tmp_path / "results" / "synthetic" / "heatmaps"
    assert sorted(p.name for p in out.iterdir()) == ["abmil", "gallery.html"]
    split = pd.read_csv(tmp_path / "results" / "synthetic" / "splits" / "mccv0.csv")
    index = pd.read_csv(out / "abmil" / "index.csv")
    assert sorted(index.slide_id) == sorted(split.slide_id[split.part == "test"])
    predictions = pd.read_csv(tmp_path / "results" / "synthetic" / "runs" / "abmil" / "mccv0" / "0" / "predictions.csv")
    assert index.set_index("slide_id").predicted.to_dict() == predictions.set_index("slide_id").predicted.to_dict()
    for sid, n in zip(index.slide_id, index.n_tiles, strict=True):
        assert (out / "abmil" / f"{sid}.png").stat().st_size > 1000
        tiles = pd.read_csv(out / "abmil" / f"{sid}.csv")
        assert len(tiles) == n and tiles.lesion_fraction.between(0, 1).all()  # synthetic: truth for every tile
    assert (out / "gallery.html").read_text().count("data:image/png;base64,") == len(index)
    shutil.rmtree(tmp_path / "resources", ignore_errors=True)
