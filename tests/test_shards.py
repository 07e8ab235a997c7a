"""Shards: stable membership, slide-by-slide resume, bad slides inside a shard, manifests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from slidetrain.data.shards import _bits, assign_shards, read_manifest, shard_of
from slidetrain.errors import ConfigError, ShardError
from slidetrain.wsi.features import FeatureJob, extract_features, read_features
from slidetrain.wsi.shard import PREPROCESS_OUTPUTS, preprocess_shard, synthesize_shard

PARAMS = {
    "mask_preset": "default",
    "target_magnification": 5.0,
    "tile_px": 64,
    "overlap_px": 0,
    "min_tissue_fraction": 0.5,
    "image_magnification": 1.25,
}


# --- membership ------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_shard", [1, 3, 8, 32])
def test_shards_partition_the_slides_within_the_size(per_shard):
    ids = [f"slide_{i:04d}" for i in range(300)]
    shards = assign_shards(ids, per_shard)
    members = [s for m in shards.values() for s in m]
    assert sorted(members) == sorted(ids)
    assert all(1 <= len(m) <= per_shard for m in shards.values())
    if per_shard == 1:
        assert len(shards) == len(ids)
    assert assign_shards(list(reversed(ids)), per_shard).keys() == shards.keys()  # order-free


@pytest.mark.parametrize("per_shard", [1, 4, 16])
def test_adding_slides_changes_only_the_shards_they_land_in(per_shard):
    ids = [f"TCGA-{i:05d}" for i in range(400)]
    before = assign_shards(ids, per_shard)
    for new in (["TCGA-new-1"], [f"extra_{i}" for i in range(40)]):
        after = assign_shards(ids + new, per_shard)
        home = shard_of(after)
        for name, members in before.items():
            landed = [s for s in new if _bits(s).startswith(name[1:])]
            if not landed:  # no new slide hashes into this shard: it is there, unchanged
                assert after.get(name) == members, name
            else:  # it took them, or split into shards below it (its old slides, plus the new ones)
                assert all(home[s].startswith(name) for s in members + landed), name
        assert sum(after.get(name) == m for name, m in before.items()) >= len(before) - len(new)


def test_slides_per_shard_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="slides_per_shard"):
        assign_shards(["a"], 0)


# --- preprocessing shards --------------------------------------------------------------------------


@pytest.fixture
def slide_pairs(synthetic_slides):
    return [(spec.slide_id, str(path)) for path, _, spec in synthetic_slides[:4]]


def _mtimes(root: Path, slide_id: str) -> dict[str, int]:
    return {k: (root / t.format(slide=slide_id)).stat().st_mtime_ns for k, t in PREPROCESS_OUTPUTS.items()}


def test_killed_preprocess_shard_resumes_with_only_the_rest(slide_pairs, tmp_path):
    root, manifest = tmp_path / "results" / "synthetic", tmp_path / "m.tsv"
    cmd = [
        sys.executable,
        "-m",
        "slidetrain.cli",
        "preprocess-shard",
        "--shard",
        "h0",
        "--out-root",
        str(root),
        "--params",
        json.dumps(PARAMS),
        "--manifest",
        str(manifest),
        "--slides",
        *[f"{s}={p}" for s, p in slide_pairs],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = root / "qc" / "status" / f"{slide_pairs[0][0]}.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # killed after the first slide, in the middle of the rest
    proc.wait()
    assert first.exists() and not manifest.exists()
    finished = [s for s, _ in slide_pairs if (root / "qc" / "status" / f"{s}.json").exists()]
    assert len(finished) < len(slide_pairs), "the shard finished before it could be killed"
    before = {s: _mtimes(root, s) for s in finished}

    ran = []
    rows = preprocess_shard("h0", slide_pairs, root, PARAMS, manifest=manifest)
    for s, _ in slide_pairs:
        if s in before:
            assert _mtimes(root, s) == before[s], f"{s} was redone"
        else:
            ran.append(s)
    assert ran == [s for s, _ in slide_pairs if s not in finished]
    assert [r["slide_id"] for r in rows] == [s for s, _ in slide_pairs]
    assert [r["slide_id"] for r in read_manifest(manifest)] == [s for s, _ in slide_pairs]
    # and a third run does nothing at all
    stamps = {s: _mtimes(root, s) for s, _ in slide_pairs}
    preprocess_shard("h0", slide_pairs, root, PARAMS, manifest=manifest)
    assert {s: _mtimes(root, s) for s, _ in slide_pairs} == stamps


def test_changed_parameters_redo_the_slides(slide_pairs, tmp_path):
    root = tmp_path / "r"
    preprocess_shard("h0", slide_pairs[:1], root, PARAMS)
    before = _mtimes(root, slide_pairs[0][0])
    preprocess_shard("h0", slide_pairs[:1], root, {**PARAMS, "min_tissue_fraction": 0.6})
    after = _mtimes(root, slide_pairs[0][0])
    assert all(after[k] > before[k] for k in before)


def _with_bad_slide(slide_pairs, tmp_path):
    bad = tmp_path / "not_a_slide.svs"
    bad.write_text("this is not a slide\n")
    return [slide_pairs[0], ("broken_07", str(bad)), slide_pairs[1]]


def test_bad_slide_stops_the_shard_naming_it(slide_pairs, tmp_path):
    root, manifest = tmp_path / "r", tmp_path / "m.tsv"
    with pytest.raises(ShardError, match=r"shard h01: slide broken_07: .*not a slide format"):
        preprocess_shard("h01", _with_bad_slide(slide_pairs, tmp_path), root, PARAMS, "error", manifest)
    assert not manifest.exists()
    assert (root / "tiles" / f"{slide_pairs[0][0]}.h5").exists()  # the finished slide stays
    assert not (root / "tiles" / f"{slide_pairs[1][0]}.h5").exists()
    assert not (root / "qc" / "status" / "broken_07.json").exists()


def test_bad_slide_is_excluded_and_the_shard_completes(slide_pairs, tmp_path):
    root, manifest = tmp_path / "r", tmp_path / "m.tsv"
    preprocess_shard("h01", _with_bad_slide(slide_pairs, tmp_path), root, PARAMS, "exclude", manifest)
    rows = {r["slide_id"]: r for r in read_manifest(manifest)}
    assert rows["broken_07"]["status"] == "excluded" and "not a slide format" in rows["broken_07"]["reason"]
    assert rows[slide_pairs[1][0]]["status"] == "ok"
    for row in rows.values():  # manifests match the per-slide files
        for key in PREPROCESS_OUTPUTS:
            assert Path(row[key]).exists(), (row["slide_id"], key)
        assert json.loads(Path(row["status_json"]).read_text())["status"] == row["status"]
    # under `error`, an excluded slide is not taken as done: it fails again, loudly
    with pytest.raises(ShardError, match="broken_07"):
        preprocess_shard("h01", _with_bad_slide(slide_pairs, tmp_path), root, PARAMS, "error", manifest)


def test_synthesize_shard_skips_finished_slides(tmp_path):
    slides = [("syn_a", "normal"), ("syn_b", "high_grade")]
    out, manifest = tmp_path / "slides", tmp_path / "m.tsv"
    synthesize_shard("h", slides, out, seed=1, size_range_px=(1500, 1600), manifest=manifest)
    stamp = (out / "syn_a.tiff").stat().st_mtime_ns
    (out / "syn_b.tiff").unlink()
    synthesize_shard("h", slides, out, seed=1, size_range_px=(1500, 1600), manifest=manifest)
    assert (out / "syn_a.tiff").stat().st_mtime_ns == stamp and (out / "syn_b.tiff").exists()
    synthesize_shard("h", slides, out, seed=2, size_range_px=(1500, 1600))  # another seed: redrawn
    assert (out / "syn_a.tiff").stat().st_mtime_ns > stamp
    assert [r["slide"] for r in read_manifest(manifest)] == [str(out / "syn_a.tiff"), str(out / "syn_b.tiff")]


# --- feature shards --------------------------------------------------------------------------------


@pytest.fixture
def preprocessed(slide_pairs, tmp_path):
    root = tmp_path / "results"
    pairs = _with_bad_slide(slide_pairs, tmp_path)
    preprocess_shard("h", pairs, root, PARAMS, "exclude")
    return pairs, root


def _jobs(pairs, root, out):
    return [FeatureJob(s, Path(p), root / "tiles" / f"{s}.h5", out / f"{s}.h5") for s, p in pairs]


def test_reader_workers_give_the_same_features(preprocessed, tmp_path):
    pairs, root = preprocessed
    manifest = tmp_path / "f.tsv"
    extract_features(_jobs(pairs, root, tmp_path / "w0"), "resnet18", batch_size=7, workers=0)
    extract_features(_jobs(pairs, root, tmp_path / "w2"), "resnet18", batch_size=7, workers=2, manifest=manifest)
    for s, _ in pairs:
        a, ca = read_features(tmp_path / "w0" / f"{s}.h5")
        b, cb = read_features(tmp_path / "w2" / f"{s}.h5")
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert np.array_equal(ca, cb)
    rows = {r["slide_id"]: r for r in read_manifest(manifest)}
    assert rows["broken_07"]["status"] == "excluded" and read_features(rows["broken_07"]["features"])[0].shape[0] == 0
    assert all(Path(r["features"]).exists() for r in rows.values())


def test_feature_shard_resumes_and_redoes_retiled_slides(preprocessed, tmp_path):
    pairs, root = preprocessed
    out = tmp_path / "f"
    jobs = _jobs(pairs, root, out)
    extract_features(jobs[:1], "resnet18", batch_size=16)
    stamp = jobs[0].out_h5.stat().st_mtime_ns
    rows = extract_features(jobs, "resnet18", batch_size=16, workers=1)
    assert [r["slide_id"] for r in rows] == [j.slide_id for j in jobs[1:]]  # only the rest
    assert jobs[0].out_h5.stat().st_mtime_ns == stamp
    with h5py.File(jobs[2].tiles_h5, "a") as f:  # the slide was re-tiled: its features are stale
        coords, attrs = f["coords"][:], dict(f["coords"].attrs)
        del f["coords"]
        f.create_dataset("coords", data=coords[:-1])
        f["coords"].attrs.update(attrs)
    rows = extract_features(jobs, "resnet18", batch_size=16)
    assert [r["slide_id"] for r in rows] == [jobs[2].slide_id]
    assert extract_features(jobs, "resnet18", batch_size=16) == []


def test_unreadable_slide_stops_the_feature_shard_naming_it(preprocessed, tmp_path):
    pairs, root = preprocessed
    jobs = _jobs(pairs, root, tmp_path / "f")
    moved = tmp_path / "moved.tiff"
    os.replace(jobs[2].slide_path, moved)  # the slide file vanished after preprocessing
    try:
        with pytest.raises(ShardError, match=f"shard h: slide {jobs[2].slide_id}"):
            extract_features(jobs, "resnet18", batch_size=16, workers=1, shard="h")
    finally:
        os.replace(moved, jobs[2].slide_path)
    assert jobs[0].out_h5.exists()  # finished before it: kept
