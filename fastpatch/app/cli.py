"""`fastpatch` command line: one sub-command per module in fastpatch.app.commands."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
COMMAND_MODULES = ("bench", "fit", "eval", "inspect", "convert", "demo", "build")


def _load_commands():
    commands = []
    for name in COMMAND_MODULES:
        try:
            commands.append(importlib.import_module(f"fastpatch.app.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"fastpatch.app.commands.{name}":
                raise
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastpatch",
        description="Activation patches fused into the residual add + norm. "
                    "Run `fastpatch COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
