"""`fastpatch` command line: one sub-command per module in fastpatch.app.commands."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
COMMAND_MODULES = ("bench", "fit", "eval", "inspect", "convert", "demo", "build", "doctor", "registry")


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
        epilog="A mistake a person can fix (a wrong site, a missing file or package, a bad value) is reported "
               "in one line with exit status 2; set FASTPATCH_TRACEBACK=1 to see the traceback instead.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


# What a person can fix (a wrong site, a missing file or package, a bad value): one line, exit 2.
# FASTPATCH_TRACEBACK=1 shows the full traceback instead.
USER_ERRORS = (ValueError, OSError, ImportError)


def error_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        return f"{exc.filename}: no such file or folder"
    text = " ".join(str(exc).split())  # one line, whatever the message held
    return text or type(exc).__name__


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("FASTPATCH_TRACEBACK"):
            raise
        print(f"fastpatch {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastpatch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
