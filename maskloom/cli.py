"""`maskloom ...`: the command-line entry point.

Each subcommand lives in ``maskloom/commands/<name>.py`` with ``HELP``, ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS: dict[str, str] = {
    "demo": "the main job: demo data -> preprocessing -> omni training -> evaluation -> report",
    "demo-data": "write a small labelled demo dataset for all seven modalities",
    "preprocess": "raw files -> a sharded token table (Ray)",
    "inspect": "schema, counts, length histogram and errors of a token table; render samples",
    "recipes": "list the built-in recipes",
    "train": "pretrain a masked model with a recipe on token tables",
    "eval": "linear-probe / kNN / forecasting evaluation of a trained run",
    "show": "draw original / masked / reconstructed samples of a trained run",
}


def _module(name: str):
    return importlib.import_module(f"maskloom.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskloom",
        description="maskloom: self-supervised masked modeling across modalities.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            mod = _module(name)
            p.description = getattr(mod, "HELP", help_text)
            mod.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # find the subcommand (first non-option argument) so only its module is imported
    cmd = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(cmd if cmd in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_module(args.command).run(args) or 0)
    except BrokenPipeError:
        # the reader of our output went away (`maskloom recipes | head -1`): stop quietly, as Unix
        # tools do; point stdout at /dev/null so that Python's flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except ValueError as e:
        # user-side problems found deep inside any command, one line each: an --out that names a file
        # or cannot be made, a table found unreadable midway (a shard missing or damaged since the
        # manifest was written)
        from maskloom._paths import OutDirError

        tables = sys.modules.get("maskloom.tables")
        if not isinstance(e, OutDirError) and (tables is None or not isinstance(e, tables.TableError)):
            raise
        print(f"maskloom {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
