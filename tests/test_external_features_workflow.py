"""Table 1 from features other tools wrote: a dataset's `features_dir` of TRIDENT-layout h5 files, run by
Snakemake on a tiny config. No tiling, preprocessing or extraction job is planned; the slide files do not
exist. A slide without a file, or of another dimension, stops the run naming it and the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_external_features import _bag, write_trident

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow

N_SLIDES = 12
DIM = 24  # test_external_features._bag's feature dimension
#: rules that tile, preprocess, draw, download or encode slides: none may be planned for a features_dir dataset
SLIDE_RULES = (
    "extract_features_shard",
    "feature_index",
    "preprocess_shard",
    "synthesize_shard",
    "download_slide",
)


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    cmd += ["--configfile", str(workdir / "config" / "config.yaml"), "--cores", "2", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def trident_workdir(root: Path, drop: str | None = None, odd_dim: str | None = None) -> tuple[Path, Path]:
    """A working directory whose only dataset is a sheet of slides that exist only as TRIDENT feature files
    (`drop`: a slide without a file; `odd_dim`: a slide of another dimension): (workdir, features folder)."""
    work, folder = root / "work", root / "trident" / "20x_256px_0px_overlap" / "features_uni_v1"
    (work / "config" / "sheets").mkdir(parents=True)
    rows = []
    for i in range(N_SLIDES):
        slide = f"s{i:02d}"
        rows.append(
            {"slide_id": slide, "patient_id": f"p{i:02d}", "label": "ab"[i % 2], "source": f"/absent/{slide}.svs"}
        )
        if slide != drop:
            write_trident(folder, slide, *_bag(i, dim=DIM // 2 if slide == odd_dim else DIM))
    pd.DataFrame(rows).to_csv(work / "config" / "sheets" / "trident.tsv", sep="\t", index=False)
    config = yaml.safe_load((REPO / "tests" / "data" / "tiny_config.yaml").read_text())
    config["datasets"] = {
        "trident": {"sheet": "config/sheets/trident.tsv", "classes": ["a", "b"], "features_dir": str(folder)}
    }
    config["table1"] = {"datasets": ["trident"], "methods": ["maxpool", "abmil"]}
    config["table4"] = {"datasets": ["trident"], "methods": ["local_k4"]}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return work, folder


def planned_rules(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The `Job stats` table of a dry run: rule -> job count."""
    stats = proc.stdout.split("Job stats:", 1)[1].split("Reasons:", 1)[0]
    rows = [line.split() for line in stats.splitlines()[3:]]
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[1].isdigit() and r[0] != "total"}


@pytest.fixture(scope="module")
def trident_run(tmp_path_factory):
    work, folder = trident_workdir(tmp_path_factory.mktemp("trident"))
    dry = snakemake(work, "-n", "results/tables/table1.csv")
    assert dry.returncode == 0, dry.stderr[-3000:]
    real = snakemake(work, "results/tables/table1.csv")
    assert real.returncode == 0, f"{real.stdout[-3000:]}\n{real.stderr[-3000:]}"
    return work, folder, planned_rules(dry)


def test_table1_trains_on_trident_features_without_extraction(trident_run):
    work, folder, planned = trident_run
    assert not [r for r in planned if r.startswith(SLIDE_RULES)], planned
    assert planned["external_feature_index"] == 1 and planned["train_mil"] == 2 and planned["table1"] == 1
    table = pd.read_csv(work / "results" / "tables" / "table1.csv")
    assert sorted(table.method) == ["abmil", "maxpool"] and set(table.dataset) == {"trident"}
    assert table.auroc.between(0, 1).all() and (table.n_seeds == 1).all()
    index = pd.read_csv(work / "results" / "trident" / "external_features" / "index.csv")
    assert len(index) == N_SLIDES and (index["dim"] == DIM).all() and (index.n_tiles > 0).all()
    status = pd.read_csv(work / "results" / "trident" / "qc" / "status.csv")
    assert (status.status == "ok").all() and len(status) == N_SLIDES
    run = json.loads((work / "results" / "trident" / "runs" / "abmil" / "mccv0" / "0" / "run.json").read_text())
    assert str(folder) in json.dumps(run)  # trained on the folder's files, not on a copy
    assert not (work / "results" / "trident" / "tiles").exists()
    assert not (work / "results" / "trident" / "features").exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ({"drop": "s05"}, "slide s05: no feature file in {folder}"),
        ({"odd_dim": "s07"}, f"slide s07: features in {{folder}} have dimension {DIM // 2}, expected {DIM}"),
    ],
    ids=["missing_file", "other_dimension"],
)
def test_a_missing_file_or_another_dimension_stops_the_run_naming_slide_and_folder(tmp_path, case, expected):
    work, folder = trident_workdir(tmp_path, **case)
    proc = snakemake(work, "results/tables/table1.csv")
    assert proc.returncode != 0
    assert "external_feature_index" in proc.stdout + proc.stderr
    log = (work / "logs" / "trident" / "external_features" / "index.log").read_text()
    assert expected.format(folder=folder) in log, log[-2000:]
    assert not (work / "results" / "trident" / "runs").exists()  # nothing trained on a partial folder
