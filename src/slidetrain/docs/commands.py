"""`slidetrain docs-benchmarks`: the generated docs pages' subcommand (cli.py adds it)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_docs_benchmarks(a: argparse.Namespace) -> None:
    from slidetrain.docs.benchmarks import write_page

    write_page(Path(a.root), Path(a.out))


def add_parsers(sub) -> None:
    s = sub.add_parser("docs-benchmarks", help="write docs/benchmarks.md from results/ (tables, stamps, commands)")
    s.add_argument("--root", default=".", help="working directory holding results/ (default: .)")
    s.add_argument("--out", required=True, help="Markdown page, e.g. docs/benchmarks.md")
    s.set_defaults(func=cmd_docs_benchmarks)
