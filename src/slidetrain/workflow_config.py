"""How a user's --configfile combines with the default config/config.yaml.

Snakemake deep-merges every --configfile into the Snakefile's `configfile:`. That suits an overlay
(config/bench_gpu.yaml changes a few bench keys), but not a user's own datasets: merged, the
default's synthetic dataset stays in `datasets`, every per-dataset step (the QC table depends on all
datasets) plans its 150 slides, and the default's CPU settings leak into the user's method blocks.
So blocks that name things replace the default's instead of merging into it:

- `datasets`: the user's datasets, and only those, when the user's config has the key;
- each block under `methods` that the user's config has (its keys only; omitted keys take the
  method's reference defaults, not the default config's CPU values);
- `splits.official` and the dataset lists of `table1`/`table4` (lists replace anyway);
- `derived_datasets` (the default derives `synthetic_binary` from `synthetic`): the user's, or none,
  less those whose `from` the user's datasets do not hold (said on stderr);
  a `tilebag.datasets` the user did not set keeps only the datasets that still exist.
A `table4` naming datasets the config does not define follows `table1.datasets` (said on stderr).
- `offload_tables` (Big-Layers Tables 1/2): the user's block whole when it has one (the default's CPU
  sizes must not leak into it); with the user's datasets, only the tables whose `dataset` and
  `external` cohort both still exist (said on stderr; e.g. a copy of config.yaml).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping


def replace_named_blocks(config: dict, user: Mapping) -> dict:
    """Undo the deep merge for the blocks above; `config` is the merged dict (changed in place)."""
    if not user:
        return config
    if "datasets" in user:
        config["datasets"] = copy.deepcopy(dict(user["datasets"]))
        table4 = config.get("table4")
        unknown = sorted(set(table4.get("datasets", [])) - set(config["datasets"])) if table4 else []
        if unknown:  # e.g. a config copied from config.yaml keeps table4: [synthetic]
            table4["datasets"] = list(config.get("table1", {}).get("datasets", []))
            print(
                f"config: table4.datasets named {unknown}, which the config does not define;"
                f" Table 4 follows table1.datasets {table4['datasets']}",
                file=sys.stderr,
            )
        derived = copy.deepcopy(dict(user.get("derived_datasets") or {}))
        orphans = sorted(n for n, block in derived.items() if block.get("from") not in config["datasets"])
        if orphans:  # e.g. a config copied from config.yaml keeps synthetic_binary (from: synthetic)
            print(
                f"config: derived_datasets {orphans} derive from datasets the config does not define;"
                " they are left out",
                file=sys.stderr,
            )
        config["derived_datasets"] = {n: b for n, b in derived.items() if n not in orphans}
        known = set(config["datasets"]) | set(config["derived_datasets"])
        tilebag = config.get("tilebag")
        if tilebag and "datasets" not in (user.get("tilebag") or {}):
            tilebag["datasets"] = [d for d in tilebag.get("datasets", []) if d in known]
    if "offload_tables" in user:
        config["offload_tables"] = copy.deepcopy(dict(user["offload_tables"] or {}))
    if "datasets" in user and config.get("offload_tables"):
        known = set(config["datasets"]) | set(config.get("derived_datasets") or {})
        tables = config["offload_tables"].get("tables") or {}
        dropped = sorted(n for n, t in tables.items() if {t.get("dataset"), t.get("external")} - known)
        if dropped:
            print(
                f"config: offload_tables.tables {dropped} train or test on datasets the config does not define;"
                " they are left out",
                file=sys.stderr,
            )
        config["offload_tables"]["tables"] = {n: t for n, t in tables.items() if n not in dropped}
    for method, block in (user.get("methods") or {}).items():
        config.setdefault("methods", {})[method] = copy.deepcopy(block)
    official = (user.get("splits") or {}).get("official")
    if official is not None:
        config["splits"]["official"] = copy.deepcopy(dict(official))
    return config
