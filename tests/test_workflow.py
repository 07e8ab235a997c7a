"""The whole DAG on a tiny config, as a user runs it: snakemake from a fresh folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from slidetrain.wsi.synthetic import synthetic_sheet

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_config.yaml"
pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
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
    # Rules call the `slidetrain` command: take it from this interpreter's environment, activated or not.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    (work / "config" / "sheets").mkdir(parents=True)
    shutil.copy(TINY, work / "config" / "config.yaml")
    sheet = synthetic_sheet(15, seed=3)
    # One file that is not a slide: with on_bad_slide: exclude it must be listed, with its reason, not skipped.
    (work / "not_a_slide.svs").write_text("this is not a slide\n")
    bad = pd.DataFrame(
        [{"slide_id": "broken_01", "patient_id": "pat_bad", "label": "normal", "source": str(work / "not_a_slide.svs")}]
    )
    pd.concat([sheet, bad]).to_csv(work / "config" / "sheets" / "synthetic.tsv", sep="\t", index=False)
    proc = snakemake(
        work,
        "results/tables/table1.csv",
        "results/tables/table4.csv",
        "results/bench/preprocess.csv",
        "results/qc/excluded.csv",
    )
    return work, proc


def test_tiny_config_runs_the_whole_dag(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results" / "tables" / "table1.csv")
    assert list(table.columns) == [
        "method",
        "dataset",
        "accuracy",
        "auroc",
        "accuracy_std",
        "auroc_std",
        "n_seeds",
        "paper_accuracy",
        "paper_auroc",
    ]
    assert sorted(table.method) == ["abmil", "local_k4", "maxpool"]
    assert (table.n_seeds == 1).all()
    assert table.accuracy.between(0, 1).all()
    assert (work / "results" / "tables" / "table1.md").read_text().startswith("| method |")
    run = work / "results" / "synthetic" / "runs" / "abmil" / "mccv0" / "0"
    for name in ("model.pt", "history.csv", "run.json", "predictions.csv", "metrics.json", "attention.h5"):
        assert (run / name).exists(), name
    whole_image = work / "results" / "synthetic" / "runs" / "local_k4" / "mccv0" / "0"
    for name in ("model.pt", "history.csv", "run.json", "predictions.csv", "metrics.json"):
        assert (whole_image / name).exists(), name
    assert not list(work.rglob(".tmp-*")), "a temporary file was left behind"


def test_table4_reads_the_ablation_runs(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results" / "tables" / "table4.csv")
    assert list(table.columns) == ["setting", "dataset", "accuracy", "paper_accuracy", "accuracy_std", "n_runs"]
    assert table.setting.tolist() == ["K=4 with RFR"] and table.n_runs.tolist() == [1]
    metrics = pd.read_json(
        work / "results" / "synthetic" / "runs" / "local_k4" / "mccv0" / "0" / "metrics.json", typ="series"
    )
    assert table.accuracy.iloc[0] == pytest.approx(metrics["metrics"]["accuracy"], abs=1e-4)


def test_bad_slide_is_excluded_with_its_reason(tiny_run):
    work, _ = tiny_run
    excluded = pd.read_csv(work / "results" / "qc" / "excluded.csv")
    assert excluded.slide_id.tolist() == ["broken_01"]
    assert "not a slide format" in excluded.reason.iloc[0]
    split = pd.read_csv(work / "results" / "synthetic" / "splits" / "mccv0.csv")
    assert "broken_01" not in set(split.slide_id)
    assert len(split) == 15


def test_preprocess_benchmark_has_every_slide(tiny_run):
    work, _ = tiny_run
    bench = pd.read_csv(work / "results" / "bench" / "preprocess.csv")
    ok = bench[bench.dataset == "synthetic"].dropna(subset=["mask_s"])
    assert len(ok) == 15
    assert (ok[["mask_s", "tile_s", "image_s", "features_s"]] >= 0).all().all()
    assert (ok.n_tiles > 0).all()
    assert "bench_large" in set(bench.dataset)


def test_rerun_has_nothing_to_do(tiny_run):
    work, _ = tiny_run
    proc = snakemake(work, "-n", "results/tables/table1.csv")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_unknown_method_is_a_parse_time_error(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = (
        (work / "config" / "config.yaml")
        .read_text()
        .replace("methods: [maxpool, abmil, local_k4]", "methods: [maxpool, nosuchmil]")
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(work),
            "--configfile",
            str(bad),
            "-n",
            "results/tables/table1.csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "nosuchmil" in proc.stdout + proc.stderr


def test_manifests_match_the_per_slide_files(tiny_run):
    work, _ = tiny_run
    from slidetrain.data.shards import read_manifest

    sheet = pd.read_csv(work / "config" / "sheets" / "synthetic.tsv", sep="\t")
    shards = work / "results" / "synthetic" / "shards"
    steps = {"preprocess": shards / "preprocess", "features": shards / "features" / "resnet18"}
    assert len(list(steps["preprocess"].glob("*.tsv"))) > 1, "the tiny sheet should make several shards"
    status = pd.read_csv(work / "results" / "synthetic" / "qc" / "status.csv", keep_default_na=False)
    for step, folder in steps.items():
        rows = [r for m in sorted(folder.glob("*.tsv")) for r in read_manifest(m)]
        assert sorted(r["slide_id"] for r in rows) == sorted(sheet.slide_id), step
        for row in rows:
            for key, value in row.items():
                if key not in ("slide_id", "status", "reason"):
                    assert (work / value).exists(), (step, row["slide_id"], key)
            expected = status.set_index("slide_id").loc[row["slide_id"]]
            assert (row["status"], row["reason"]) == (expected.status, expected.reason), (step, row["slide_id"])
    synthesized = [r for m in (shards / "synthesize").glob("*.tsv") for r in read_manifest(m)]
    assert sorted(r["slide_id"] for r in synthesized) == sorted(sheet.slide_id[sheet.source == "synthetic"])


def test_adding_a_slide_reruns_only_its_shard(tiny_run, tmp_path):
    from slidetrain.data.shards import assign_shards, shard_of

    work, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)  # keeps mtimes and .snakemake metadata
    sheet_path = copy / "config" / "sheets" / "synthetic.tsv"
    sheet = pd.read_csv(sheet_path, sep="\t")
    new = pd.DataFrame([{"slide_id": "syn_new_01", "patient_id": "pat_new", "label": "normal", "source": "synthetic"}])
    pd.concat([sheet, new]).to_csv(sheet_path, sep="\t", index=False)
    before = assign_shards(sheet.slide_id, 4)
    after = assign_shards([*sheet.slide_id, "syn_new_01"], 4)
    home = shard_of(after)["syn_new_01"]
    # the shards that change: where the new slide lands (its old shard may split in two)
    changed = {name for name, members in after.items() if before.get(name) != members}
    assert home in changed and len(changed) < len(after)
    proc = snakemake(copy, "-n", "results/qc/excluded.csv", "results/synthetic/features/resnet18/index.csv")
    out = proc.stdout + proc.stderr
    planned: dict[str, set[str]] = {}
    rule = None
    for line in out.splitlines():
        if line.startswith("rule "):
            rule = line[5:].rstrip(":")
        elif "wildcards:" in line and "shard=" in line:
            planned.setdefault(rule, set()).add(line.split("shard=")[1].split(",")[0].strip())
    for step in ("synthesize_shard", "preprocess_shard", "extract_features_shard"):
        assert planned.get(step) == changed, (step, planned.get(step), changed)


def test_the_report_renders_the_tables_and_the_excluded_slides_pictures(tiny_run):
    """`snakemake --report` on the built DAG: Tables 1 and 4 as HTML items and the QC page that shows
    the excluded slide's picture, each with its caption; nothing reruns."""
    work, _ = tiny_run
    snakemake(work, "--report", "report.html", "results/tables/table1.csv", "results/tables/table4.csv")
    report = (work / "report.html").read_text()
    for item in ("table1.html", "table4.html", "excluded.html"):
        assert item in report, item
    for caption in ("Local-learning paper, Table 1", "the RFR ablation", "Quality control of synthetic"):
        assert caption in report, caption
    qc = (work / "results" / "synthetic" / "qc" / "excluded.html").read_text()
    assert "broken_01" in qc and "data:image/jpeg;base64," in qc
    proc = snakemake(work, "-n", "results/tables/table1.csv")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_paper_name_the_paper_lacks_stops_table1_with_a_message_naming_it(tiny_run, tmp_path):
    """A typo in a dataset's paper_name fails the table rule (its log names the key and the value) instead
    of writing a table with a blank paper column; the good config then rebuilds the table."""
    work, _ = tiny_run
    good = work / "config" / "config.yaml"
    text = good.read_text()
    assert text.count("paper_name: null") == 1
    bad = work / "config" / "bad_paper_name.yaml"
    bad.write_text(text.replace("paper_name: null", "paper_name: TCGA-NSCLX"))
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(REPO / "Snakefile"),
                "-d",
                str(work),
                "--configfile",
                str(bad),
                "--cores",
                "1",
                "results/tables/table1.csv",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            },
        )
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "table1" in proc.stdout + proc.stderr  # the failing rule
        log = (work / "logs" / "tables" / "table1.log").read_text()
        assert "datasets.synthetic.paper_name = 'TCGA-NSCLX'" in log and "TCGA-NSCLC" in log  # the names expected
        assert not (work / "results" / "tables" / "table1.csv").exists()
    finally:  # later tests (and reruns) find the table of the good config
        snakemake(work, "results/tables/table1.csv")
    assert "TCGA-NSCLX" not in (work / "logs" / "tables" / "table1.log").read_text()
