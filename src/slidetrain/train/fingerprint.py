"""A fingerprint of what a training run reads, so that a checkpoint knows whether it is still current.

The checkpoint tag (common.config_hash: method, config, seed, split text) cannot see the files a run
reads (feature, image, slide and tile files) nor settings handed over beside the config (the tile-bag
sampling). A run resumed after those were regenerated would train one model on two inputs. So every
trainer passes `input_fingerprint(files, settings)` to run_epochs, which keeps it in the checkpoint
and starts over, logging `fingerprint_changes`, when a resume finds it different.

A file is summarised by its size and modification time in nanoseconds: no file is read, so this costs
one stat per slide even for 10,000 slides, and any rewrite (extraction re-run, copy, touch) shows up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from slidetrain.errors import SlidetrainError

_MAX_LISTED = 5  # how many changed files a message names


def input_fingerprint(files: Iterable[str | os.PathLike], settings: dict | None = None) -> dict:
    """{"files": {path: [size_bytes, mtime_ns]}, "settings": settings as JSON values}.

    `files`: every file the training reads (train and val parts); paths are kept as given, so the
    same run directory resumed with another data folder is another input. A missing file is an
    error naming it (the trainer would fail on it anyway; saying so here is clearer).
    """
    summary = {}
    for path in files:
        path = Path(path)
        try:
            st = path.stat()
        except OSError as err:
            raise SlidetrainError(f"input file {path} of the training run cannot be read ({err.strerror})") from err
        summary[str(path)] = [int(st.st_size), int(st.st_mtime_ns)]
    # through JSON: tuples become lists, so a fingerprint compares equal after torch.save/load
    return {"files": dict(sorted(summary.items())), "settings": json.loads(json.dumps(settings or {}, default=str))}


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def fingerprint_changes(old: dict | None, new: dict) -> list[str]:
    """What differs between a checkpoint's fingerprint and the current one, in words (empty: the same)."""
    if old is None:
        return ["the checkpoint carries no input fingerprint"]
    reasons = []
    old_files, new_files = old.get("files", {}), new["files"]
    added = sorted(set(new_files) - set(old_files))
    removed = sorted(set(old_files) - set(new_files))
    resized = sorted(p for p in set(old_files) & set(new_files) if old_files[p][0] != new_files[p][0])
    touched = sorted(
        p
        for p in set(old_files) & set(new_files)
        if old_files[p][0] == new_files[p][0] and old_files[p][1] != new_files[p][1]
    )
    if added:
        reasons.append(f"{len(added)} input file(s) not read before: {_listed(added)}")
    if removed:
        reasons.append(f"{len(removed)} input file(s) no longer read: {_listed(removed)}")
    if resized:
        reasons.append(f"{len(resized)} input file(s) changed size: {_listed(resized)}")
    if touched:
        reasons.append(f"{len(touched)} input file(s) modified since: {_listed(touched)}")
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        before, now = old_settings.get(key, "<unset>"), new_settings.get(key, "<unset>")
        if before != now:
            reasons.append(f"setting {key}: {before!r} -> {now!r}")
    return reasons
