"""The ``loopwatch`` command: ``run`` monitors a whole program, ``report`` reads a recording.
Each subcommand lives in its own module; this one only wires them to the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

import loopwatch
from loopwatch import _reporting, _run

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopwatch",
        description="Find what blocks your asyncio event loop.",
    )
    parser.add_argument("--version", action="version", version=f"loopwatch {loopwatch.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _run.add_arguments(
        commands.add_parser(
            "run",
            help="run a Python program with every event loop it starts monitored",
            description=_run.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            # The program's arguments are split off first (_run.split_command_line), which needs
            # loopwatch's own options spelled out: `--thr 5` must not pass for `--threshold-ms 5`.
            allow_abbrev=False,
        )
    )
    _reporting.add_arguments(
        commands.add_parser(
            "report",
            help="summarize a recording made with --record",
            description=_reporting.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv[:1] == ["run"]:
        # Everything from the program's name on is the program's, even what looks like an option:
        # argparse only ever sees loopwatch's own options.
        own, program = _run.split_command_line(argv[1:])
        args = parser.parse_args(["run", *own])
        args.program = program
        return _run.main(args)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run.main(args)
    return _reporting.main(args)


if __name__ == "__main__":
    sys.exit(main())
