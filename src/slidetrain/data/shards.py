"""Shards: fixed groups of a dataset's slides that one job handles, and their manifests.

Membership is a pure function of the slide ids and `slides_per_shard`, and is
stable: adding slides to a sheet changes only the shards they land in.

Scheme (a binary trie over the slide ids' SHA-1 bits): start with one shard
holding every slide; while a shard holds more than `slides_per_shard` slides,
split it in two by the next bit of the hash. A shard is named `h` followed by
the hash bits that its slides share (`h` alone: the whole dataset, `h01`: the
slides whose hash starts 0, 1). Why this is stable: a shard's slides are those
whose hash starts with its bits, and it stops splitting as soon as it holds
few enough. A new slide raises the count only along its own bits, so every
other shard keeps its slides; its own shard either takes it or, when that makes
it too big, splits (into shards made only of its old slides and the new one).
Removing a slide can merge its shard with its sibling. Sizes are at most
`slides_per_shard` (about 0.7x of it on average, the hash being uniform);
`slides_per_shard: 1` gives one slide per shard.

A manifest (results/{dataset}/shards/{step}/{shard}.tsv) has one row per slide
of the shard: slide_id, status (ok | excluded), reason, then one column per
per-slide output file of the step. It is written last, atomically, so it
exists only when every slide of the shard is finished.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

from slidetrain.errors import ConfigError
from slidetrain.io import atomic_path

MAX_BITS = 64  # slide ids sharing 64 hash bits stay together (never seen: SHA-1 is 160 bits)
MANIFEST_COLUMNS = ("slide_id", "status", "reason")
STATUSES = ("ok", "excluded")


def _bits(slide_id: str) -> str:
    digest = hashlib.sha1(slide_id.encode()).digest()[: MAX_BITS // 8]
    return format(int.from_bytes(digest, "big"), f"0{MAX_BITS}b")


def assign_shards(slide_ids: Iterable[str], slides_per_shard: int) -> dict[str, list[str]]:
    """Shard name -> its slide ids (in the order given); names sorted, no empty shard."""
    if int(slides_per_shard) < 1:
        raise ConfigError(f"shards.slides_per_shard must be >= 1, got {slides_per_shard!r}")
    ids = list(slide_ids)
    bits = {s: _bits(s) for s in ids}
    shards: dict[str, list[str]] = {}
    stack = [("", ids)]
    while stack:
        prefix, members = stack.pop()
        if len(members) <= slides_per_shard or len(prefix) == MAX_BITS:
            shards[f"h{prefix}"] = members
            continue
        depth = len(prefix)
        for bit in "01":
            child = [s for s in members if bits[s][depth] == bit]
            if child:
                stack.append((prefix + bit, child))
    return dict(sorted(shards.items()))


def shard_of(shards: dict[str, list[str]]) -> dict[str, str]:
    """Slide id -> shard name."""
    return {slide: name for name, members in shards.items() for slide in members}


def write_manifest(path: str | Path, rows: list[dict], output_keys: Iterable[str]) -> None:
    """One row per slide: slide_id, status, reason, then the output files (paths as given)."""
    columns = [*MANIFEST_COLUMNS, *output_keys]
    if len(set(columns)) != len(columns):
        raise ValueError(f"manifest output keys {list(output_keys)} clash with {MANIFEST_COLUMNS}")
    for row in rows:
        if row["status"] not in STATUSES:
            raise ValueError(f"slide {row['slide_id']}: manifest status {row['status']!r} not in {STATUSES}")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, delimiter="\t", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: str(row.get(k, "")) for k in columns})


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if rows and not set(MANIFEST_COLUMNS) <= set(rows[0]):
        raise ValueError(f"{path}: not a shard manifest; expected columns {MANIFEST_COLUMNS}")
    return rows


def manifest_column(manifests: Iterable[str | Path], column: str) -> list[str]:
    """One column of several manifests, in manifest then row order (e.g. every slide's tiles file)."""
    values = []
    for path in manifests:
        for row in read_manifest(path):
            if column not in row:
                raise ValueError(f"{path}: manifest has no column {column!r}; has {sorted(row)}")
            values.append(row[column])
    return values
