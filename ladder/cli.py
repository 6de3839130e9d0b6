"""The `ladder` command: a dispatcher that owns no subcommand itself.

Each package registers its own subcommands through the `ladder.commands` entry-point group
(`generate` here in `ladder`, `serve` in `deploy`, `bench` in `bench`, ...), so this module imports
none of them and no dependency runs back down the layers.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group="ladder.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
