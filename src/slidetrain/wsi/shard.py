"""Per-slide steps run over a shard of slides in one process (see slidetrain.data.shards).

A shard job goes through its slides in order; a slide whose outputs are
already complete and were made with the same parameters is skipped, so a
killed job resumes slide by slide. Each slide's files are written atomically
at the usual per-slide paths, the status file last (it is the completion
mark). A slide that fails stops the shard with a ShardError naming it; the
finished slides stay. With `on_bad_slide: exclude` preprocessing records an
unusable slide as excluded, with its reason, and goes on. The manifest is
written when every slide is done.

    slidetrain synthesize-shard --slides s1=normal s2=high_grade --out-dir resources/D/slides ...
    slidetrain preprocess-shard --slides s1=/path/s1.svs --out-root results/D --manifest M.tsv ...
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from slidetrain.data.shards import write_manifest
from slidetrain.errors import ShardError, SlidetrainError

log = logging.getLogger(__name__)

#: per-slide outputs of preprocessing, relative to results/{dataset}/ (what downstream reads file by file)
PREPROCESS_OUTPUTS = {
    "mask": "masks/{slide}.mask.png",
    "qc": "masks/{slide}.qc.jpg",
    "tiles": "tiles/{slide}.h5",
    "image": "images/{slide}.jpg",
    "image_meta": "images/{slide}.json",
    "timings": "timings/{slide}.json",
    "status_json": "qc/status/{slide}.json",
}
#: per-slide outputs of synthesis, relative to resources/{dataset}/slides/
SYNTHESIZE_OUTPUTS = {"slide": "{slide}.tiff", "truth": "{slide}.truth.npz"}


@dataclass
class SlideTask:
    slide_id: str
    source: str  # the slide file (preprocess) or its label (synthesis)
    outputs: dict[str, Path]


def tasks_for(slides: list[tuple[str, str]], root: str | Path, layout: dict[str, str]) -> list[SlideTask]:
    root = Path(root)
    return [
        SlideTask(slide_id, source, {k: root / t.format(slide=slide_id) for k, t in layout.items()})
        for slide_id, source in slides
    ]


def fingerprint(obj: object) -> str:
    """Short hash of the parameters a slide's outputs were made with (a changed config redoes the slide)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_shard(
    step: str,
    shard: str,
    tasks: list[SlideTask],
    done: Callable[[SlideTask], dict | None],
    process: Callable[[SlideTask], dict],
    manifest: str | Path | None = None,
) -> list[dict]:
    """Run `process` on every task that `done` does not vouch for; write the manifest; return its rows.

    `done(task)` returns the slide's {status, reason} when its outputs are complete and current,
    else None; `process(task)` makes them and returns the same.
    """
    rows, ran = [], 0
    previous = [done(t) for t in tasks]  # (status, reason) of complete slides, None for the rest
    n_todo = sum(s is None for s in previous)
    log.info("%s %s: %d slides, %d already complete", step, shard, len(tasks), len(tasks) - n_todo)
    progress = tqdm(total=n_todo, desc=f"{step} {shard}", unit="slide")
    for task, status in zip(tasks, previous, strict=True):
        if status is None:
            try:
                status = process(task)
            except Exception as err:
                if not isinstance(err, SlidetrainError):
                    log.exception("%s %s: slide %s", step, shard, task.slide_id)
                raise ShardError(
                    shard,
                    task.slide_id,
                    f"{step} failed: {err} ({ran} slides finished in this run are kept; fix the slide, or set "
                    "preprocess.on_bad_slide: exclude, and rerun: finished slides are skipped)",
                ) from err
            ran += 1
            progress.update(1)
        rows.append({"slide_id": task.slide_id, **status, **{k: str(p) for k, p in task.outputs.items()}})
    progress.close()
    if manifest is not None:
        write_manifest(manifest, rows, next(iter(tasks)).outputs if tasks else [])
    return rows


# --- preprocessing -------------------------------------------------------------------------------


def preprocess_shard(
    shard: str,
    slides: list[tuple[str, str]],
    out_root: str | Path,
    params: dict,
    on_bad_slide: str = "error",
    manifest: str | Path | None = None,
) -> list[dict]:
    """Mask, tile, QC picture and slide image of every (slide_id, path) into results/{dataset} = out_root."""
    from slidetrain.io import read_json
    from slidetrain.wsi.exclusion import preprocess_or_exclude

    def stamp(task: SlideTask) -> str:
        return fingerprint({"params": params, "source": task.source})

    def done(task: SlideTask) -> dict | None:
        try:
            status = read_json(task.outputs["status_json"])
        except (OSError, ValueError):
            return None
        if status.get("fingerprint") != stamp(task) or not all(p.exists() for p in task.outputs.values()):
            return None
        if status["status"] == "excluded" and on_bad_slide != "exclude":
            return None  # excluded under `exclude`; under `error` the slide must fail again, loudly
        return {"status": status["status"], "reason": status.get("reason", "")}

    def process(task: SlideTask) -> dict:
        o = task.outputs
        outputs = {
            "mask_png": o["mask"],
            "qc_path": o["qc"],
            "tiles_h5": o["tiles"],
            "image_path": o["image"],
            "image_meta_json": o["image_meta"],
            "timings_json": o["timings"],
        }
        result = preprocess_or_exclude(
            task.source,
            task.slide_id,
            outputs=outputs,
            params=params,
            on_bad_slide=on_bad_slide,
            status_json=o["status_json"],
            fingerprint=stamp(task),
        )
        if "excluded" in result:
            return {"status": "excluded", "reason": result["excluded"]}
        return {"status": "ok", "reason": ""}

    tasks = tasks_for(slides, out_root, PREPROCESS_OUTPUTS)
    return run_shard("preprocess", shard, tasks, done, process, manifest)


# --- synthesis -----------------------------------------------------------------------------------


def synthesize_shard(
    shard: str,
    slides: list[tuple[str, str]],
    out_dir: str | Path,
    seed: int,
    size_range_px: tuple[int, int],
    manifest: str | Path | None = None,
    stain_scale: tuple[float, float] = (1.0, 1.0),
    difficulty: str = "classic",
    difficulty_overrides: dict | None = None,
) -> list[dict]:
    """Draw every (slide_id, label) as a pyramidal TIFF + truth npz in out_dir (resources/{dataset}/slides);
    `difficulty` and its overrides: slidetrain.wsi.synthetic.resolve_difficulty."""
    import numpy as np

    from slidetrain.wsi.synthetic import resolve_difficulty, synthetic_spec, write_synthetic_slide

    resolved = resolve_difficulty(difficulty, difficulty_overrides)  # a bad name or key fails before any slide

    def spec_of(task: SlideTask):
        return synthetic_spec(task.slide_id, task.source, seed, tuple(size_range_px), tuple(stain_scale), resolved)

    def done(task: SlideTask) -> dict | None:
        if not task.outputs["slide"].exists():
            return None
        try:  # the truth file carries the spec it was drawn from; the slide is renamed after it
            with np.load(task.outputs["truth"], allow_pickle=False) as z:
                same = json.loads(str(z["spec"])) == json.loads(json.dumps(spec_of(task).to_dict()))
        except (OSError, KeyError, ValueError):
            return None
        return {"status": "ok", "reason": ""} if same else None

    def process(task: SlideTask) -> dict:
        write_synthetic_slide(task.outputs["slide"], spec_of(task), truth_path=task.outputs["truth"])
        return {"status": "ok", "reason": ""}

    tasks = tasks_for(slides, out_dir, SYNTHESIZE_OUTPUTS)
    return run_shard("synthesize", shard, tasks, done, process, manifest)


def parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    """`id=value` command-line pairs -> [(id, value)]; a malformed item is an error naming it."""
    pairs = []
    for item in items:
        slide_id, sep, value = item.partition("=")
        if not sep or not slide_id or not value:
            raise ShardError("?", item, f"expected slide_id={what}, got {item!r}")
        pairs.append((slide_id, value))
    return pairs
