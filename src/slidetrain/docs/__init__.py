"""Generated documentation pages: docs/configuration.md (from the config schema, configuration.py)
and docs/benchmarks.md (from results/, benchmarks.py). commands.py adds their `slidetrain` subcommands."""
