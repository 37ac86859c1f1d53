"""The `deltaserve` command: one argparse subcommand per `server/cli_*.py` module.

Each such module defines `register(subparsers)`, which adds its subparser and sets `func=run`, where
`run(args) -> int` is the exit code. Adding a subcommand is adding a file; this one never changes.
Modules import heavy dependencies (torch, the engine) inside `run`, so `deltaserve --help` stays quick.
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Multi-tenant serving of compressed fine-tune deltas.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    folder = str(Path(__file__).parent)
    for module in sorted(m.name for m in pkgutil.iter_modules([folder]) if m.name.startswith("cli_")):
        importlib.import_module(f"{__package__}.{module}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
