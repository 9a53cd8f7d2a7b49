"""Entry point of the ``memo`` console script."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each entry: module under memo.cli defining `<name>_command_parser(subparsers)`.
SUBCOMMANDS = ["env", "plan", "launch"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memo", description="memo: long-context training memory tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"memo.cli.{name}")
        getattr(module, f"{name}_command_parser")(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
