"""The papers' configs dry-run with their example sheets, list their downloads, and plan no job of a
dataset their Table 1 does not use (a user's --configfile replaces the default's datasets)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from slidetrain.data.download import is_remote
from slidetrain.workflow_config import replace_named_blocks

REPO = Path(__file__).resolve().parents[1]


def dry_run(configfile: Path, *targets: str, expect_failure: bool = False):
    """The jobs `snakemake -n` plans: one dict per job with its rule and wildcards (or, expecting a
    failure, what it printed)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(REPO),
            *(targets or ["results/tables/table1.csv"]),
            "--configfile",
            str(configfile),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    if expect_failure:
        assert out.returncode != 0, out.stdout[-3000:]
        return out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out.stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        wc = re.search(r"wildcards: (.*)", block)
        wildcards = dict(kv.split("=", 1) for kv in wc.group(1).split(", ")) if wc else {}
        jobs.append({"rule": m.group(1), **wildcards})
    return jobs


@pytest.mark.workflow
@pytest.mark.parametrize("name", ["local_learning", "offload", "tilebag"])
def test_paper_config_dry_runs_with_downloads_of_its_table_datasets_only(name):
    path = REPO / "config" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    jobs = dry_run(path)
    used = set(config["table1"]["datasets"])
    planned = {j["dataset"] for j in jobs if "dataset" in j}
    assert planned == used, f"jobs planned for {planned - used}"
    downloads = {(j["dataset"], j["slide"]) for j in jobs if j["rule"] == "download_slide"}
    expected = set()
    for d in used:
        sheet = pd.read_csv(REPO / config["datasets"][d]["sheet"], sep="\t", dtype=str, keep_default_na=False)
        expected |= {(d, s) for s, src in zip(sheet.slide_id, sheet.source, strict=True) if is_remote(src)}
    assert downloads == expected and downloads
    assert {j["rule"] for j in jobs} >= {"download_slide", "preprocess_shard", "make_split", "table1"}
    assert "synthesize_shard" not in {j["rule"] for j in jobs}


@pytest.mark.workflow
def test_a_config_copied_from_the_default_with_one_real_dataset_plans_nothing_synthetic(tmp_path):
    """The new user's path from the issue: copy config/config.yaml, swap the dataset, --configfile it."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    sheet = tmp_path / "mine.tsv"
    rows = [f"s{i}\tp{i}\t{'LUAD' if i % 2 else 'LUSC'}\tgdc:EXAMPLE-{i}" for i in range(8)]
    sheet.write_text("slide_id\tpatient_id\tlabel\tsource\n" + "\n".join(rows) + "\n")
    config["datasets"] = {"mine": {"sheet": str(sheet), "classes": ["LUAD", "LUSC"]}}
    config["table1"] = {"datasets": ["mine"], "methods": ["maxpool", "abmil"]}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    # the default's encoder is pretrained on the synthetic cohort the user's config no longer has
    failed = dry_run(path, "results/tables/table1.csv", expect_failure=True)
    assert "pretrain.cohort: 'synthetic_pretrain' is not a dataset" in failed and "imagenet" in failed
    config["features"]["weights"] = "imagenet"  # real slides: the papers' start
    path.write_text(yaml.safe_dump(config))
    # the QC table (rule all's) plans every dataset of the config: without the replacement it also
    # planned the default's 150 synthetic slides
    jobs = dry_run(path, "results/tables/table1.csv", "results/qc/excluded.csv")
    assert {j.get("dataset") for j in jobs} - {None} == {"mine"}
    assert sum(j["rule"] == "download_slide" for j in jobs) == 8


def test_user_blocks_replace_the_defaults_instead_of_merging():
    default = {
        "datasets": {"synthetic": {"sheet": "a.tsv", "classes": ["x", "y"]}},
        "methods": {"abmil": {"feature_norm": "standardize", "epochs": 30}, "maxpool": {"epochs": 30}},
        "splits": {"mccv_folds": 3, "official": {"synthetic": "o.csv"}},
        "table1": {"datasets": ["mine"]},
        "table4": {"datasets": ["synthetic"], "methods": ["local_k4"]},
        "bench": {"device": "cpu", "threads": 2},
    }
    user = {
        "datasets": {"mine": {"sheet": "m.tsv", "classes": ["a", "b"]}},
        "methods": {"abmil": {"epochs": 5}},
        "splits": {"official": {}},
        "bench": {"device": "cuda"},
    }
    merged = {**default, "bench": {"device": "cuda", "threads": 2}}  # what Snakemake's deep merge left
    merged["datasets"] = {**default["datasets"], **user["datasets"]}
    merged["methods"] = {**default["methods"], "abmil": {"feature_norm": "standardize", "epochs": 5}}
    out = replace_named_blocks(merged, user)
    assert list(out["datasets"]) == ["mine"]
    assert out["methods"]["abmil"] == {"epochs": 5} and out["methods"]["maxpool"] == {"epochs": 30}
    assert out["splits"]["official"] == {} and out["splits"]["mccv_folds"] == 3
    assert out["table4"]["datasets"] == ["mine"]
    assert out["bench"] == {"device": "cuda", "threads": 2}  # overlays still merge
    assert replace_named_blocks({"datasets": {"a": {}}}, {}) == {"datasets": {"a": {}}}


@pytest.mark.workflow
def test_workflow_downloads_with_the_concurrency_limit_and_excludes_a_bad_slide(tmp_path):
    """rule download_slide end to end: http sources from a local server, `--resources downloads=1`
    (never two bodies at once), a slide whose md5 never matches excluded (on_bad_slide: exclude)."""
    import hashlib
    import os

    from fakeservers import FakeFile, FakeServer
    from slidetrain.data.download import exclusion_reason

    blobs = {f"s{i}": os.urandom(300_000) for i in range(3)}
    with FakeServer() as server:
        rows = []
        for i, (slide, data) in enumerate(blobs.items()):
            server.files[f"/slides/{slide}.tif"] = FakeFile(data, delay_s=0.3, corrupt=100 if i == 2 else 0)
            rows.append(
                f"{slide}\tp{i}\tLUAD\t{server.url}/slides/{slide}.tif\t{hashlib.md5(data).hexdigest()}\t{len(data)}"
            )
        sheet = tmp_path / "mine.tsv"
        sheet.write_text("slide_id\tpatient_id\tlabel\tsource\tmd5\tsize\n" + "\n".join(rows) + "\n")
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config["datasets"] = {"mine": {"sheet": str(sheet), "classes": ["LUAD", "LUSC"]}}
        config["table1"] = {"datasets": ["mine"], "methods": ["maxpool"]}
        config["preprocess"]["on_bad_slide"] = "exclude"
        config["download"] = {"retries": 1, "backoff_s": 0.01}
        path = tmp_path / "mine.yaml"
        path.write_text(yaml.safe_dump(config))
        targets = [f"resources/mine/slides/{s}.tif" for s in blobs]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(REPO / "Snakefile"),
                "-d",
                str(tmp_path),
                "--cores",
                "3",
                *targets,
                "--resources",
                "downloads=1",
                "--configfile",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert server.max_active == 1, server.max_active  # unlimited, the 3 cores fetch all 3 at once
    for slide in ("s0", "s1"):
        assert (tmp_path / f"resources/mine/slides/{slide}.tif").read_bytes() == blobs[slide]
    reason = exclusion_reason(tmp_path / "resources/mine/slides/s2.tif")
    assert reason is not None and "s2" in reason and "md5" in reason


@pytest.mark.workflow
def test_the_difficulty_probe_trains_each_preset_and_scores_no_test_part(tmp_path):
    weights = tmp_path / "encoder.pt"
    weights.write_bytes(b"")  # a weights file is a job input: it must exist for the plan (never read by -n)
    overlay = tmp_path / "weights.yaml"
    overlay.write_text(yaml.safe_dump({"features": {"weights": str(weights)}}))
    probe = yaml.safe_load((REPO / "config" / "difficulty.yaml").read_text())["difficulty_probe"]
    # --forceall: every job is planned whatever a local results/ already holds
    jobs = dry_run(REPO / "config" / "difficulty.yaml", "results/bench/difficulty.csv", "--forceall")
    rules = {j["rule"] for j in jobs}
    assert "evaluate_mil" not in rules and "difficulty_probe" in rules
    trained = {(j["dataset"], j["method"], j["split"]) for j in jobs if j["rule"] == "train_mil"}
    assert trained == {(d, m, s) for d in probe["datasets"] for m in probe["methods"] for s in probe["splits"]}
    # the pretraining cohort is drawn for the features' encoder
    drawn = {j["dataset"] for j in jobs if j["rule"] == "synthesize_shard"} - {"synthetic_pretrain"}
    presets = ("classic", "mild", "moderate", "subtle", "hard")
    assert drawn == set(probe["datasets"]) == {f"synthetic_{p}" for p in presets}
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "-F", "-s", str(REPO / "Snakefile"), "-d", str(REPO),
         "results/bench/difficulty.csv", "--configfile", str(REPO / "config" / "difficulty.yaml"), str(overlay)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    feature_jobs = sum(j["rule"] == "extract_features_shard" for j in jobs)
    assert out.stdout.count(f"--weights {weights}") == feature_jobs + 1  # every features shard and the table
