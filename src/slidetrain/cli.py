"""`slidetrain` command line: one subcommand per pipeline step, so every rule can be run by hand.

A thin dispatcher: each package registers its own subcommands with `add_parsers(sub)` in its
`commands` module. Imports are inside the subcommands: `slidetrain --help` and the light steps
must not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from slidetrain.errors import SlidetrainError

#: the packages whose `commands.add_parsers(sub)` adds subcommands, in the order `--help` lists them
COMMAND_PACKAGES = ("data", "wsi", "train", "paper", "bench", "docs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slidetrain", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for package in COMMAND_PACKAGES:
        importlib.import_module(f"slidetrain.{package}.commands").add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except SlidetrainError as err:
        print(f"slidetrain {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
