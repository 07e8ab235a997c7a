"""The Python behind the workflow's .smk files: sheet checks, shard lists, run lists, rule arguments.

The .smk files keep rules and thin wrappers bound to Snakemake's `config`; what they compute lives
here so that it is tested without a Snakemake run:

- `sheets`: read and check every dataset's sheet, the derived datasets and method blocks (parse time);
- `plan`: `Plan`, what the workflow knows once the config is parsed (sheets, splits, seeds, shards);
- `shards`: shard manifests and members, the slide files a job needs;
- `runs`: the run lists tables and targets collect (metrics.json, history.csv);
- `params`: the command-line arguments and JSON parameters rules hand to `slidetrain`;
- `offload_tables`: the same for Big-Layers Tables 1 and 2 (checks, parameters, run lists).

A bad config or sheet raises `slidetrain.errors.ConfigError` / `SheetError` naming the key or slide.
"""

from slidetrain.workflow.plan import Plan, build_plan, method_regex

__all__ = ["Plan", "build_plan", "method_regex"]
