"""`loopwatch run`: runs a Python program the way `python` would, with every event loop it starts
monitored, and the Python processes it starts too (through the environment, see _autostart)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import runpy
import sys
import zipfile
from collections.abc import Sequence
from typing import Callable, NoReturn, Optional

from loopwatch import _autostart
from loopwatch._autostart import Settings, SettingsError
from loopwatch._monitor import DEFAULT_THRESHOLD_MS
from loopwatch._recording import Recorder, RecordingError, open_recorder

DESCRIPTION = f"""\
Runs a Python program as `python` would, and prints to stderr each time synchronous code blocks
one of its asyncio event loops (any loop, in any thread; uvloop too). At exit it prints a summary.
Everything after the script or module name is the program's own command line.

  loopwatch run app.py --port 8000
  loopwatch run --threshold-ms 20 -m uvicorn app:app --workers 2

The Python processes the program starts (uvicorn --workers, multiprocessing) are monitored too,
through these environment variables, which loopwatch run sets for them. Set them yourself to
monitor a program that another tool starts (patterns are comma-separated; this needs loopwatch
installed from a wheel, whose .pth file in site-packages reads them):

  {_autostart.ENV_ENABLED}=1  {_autostart.ENV_THRESHOLD_MS}=20  {_autostart.ENV_INCLUDE}=myapp,src/  \
{_autostart.ENV_EXCLUDE}=...  {_autostart.ENV_RECORD}=run.lwrec

Exit status: the program's own (130 after Ctrl-C); 1 if the script or module is not found or the
recording cannot be written (or --record names a file that is no recording); 2 for bad options."""

USAGE = "%(prog)s [options] script.py [args ...]\n       %(prog)s [options] -m module [args ...]"

EXIT_CANNOT_START = 1  # the script or module is not found, or the recording cannot be written
EXIT_PROGRAM_ERROR = 1  # what python exits with after an uncaught exception
EXIT_INTERRUPTED = 130  # what a shell reports for a program stopped by Ctrl-C

# The options that take a value: splitting the command line must skip their values.
_OPTIONS_WITH_VALUE = ("--threshold-ms", "--include", "--exclude", "--record", "--mode")


@dataclasses.dataclass(frozen=True)
class Program:
    """The program's command line: a script and its arguments, or a module and its arguments."""

    module: bool = False
    argv: tuple[str, ...] = ()
    """The script path (or module name) first, then the program's arguments."""


def split_command_line(tokens: Sequence[str]) -> tuple[list[str], Program]:
    """Splits what follows `loopwatch run` into loopwatch's options and the program's command
    line, which starts at the first word that is not an option (or at ``-m``, or after ``--``),
    as with ``python``: in ``loopwatch run --threshold-ms 5 app.py --threshold-ms 9`` the second
    option is the program's. argparse cannot do this: it takes options from anywhere, and its
    REMAINDER drops or misreads arguments that start with ``-``."""
    own: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        rest = tuple(tokens[index + 1 :])
        if token == "--":
            return own, Program(argv=rest)
        if token == "-m":
            return own, Program(module=True, argv=rest)
        if token.startswith("-m") and not token.startswith("--"):  # -mpackage, as python takes it
            return own, Program(module=True, argv=(token[2:], *rest))
        if token == "-" or not token.startswith("-"):
            return own, Program(argv=(token, *rest))
        own.append(token)
        if token in _OPTIONS_WITH_VALUE and rest:
            own.append(rest[0])
            index += 1
        index += 1
    return own, Program()


def _option_type(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` that keeps the check's wording (argparse names the option)."""

    def convert(text: str) -> object:
        try:
            return check(text)
        except SettingsError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.add_argument(
        "--threshold-ms",
        type=_option_type(_autostart.parse_threshold),
        default=DEFAULT_THRESHOLD_MS,
        metavar="MS",
        help=f"report a callback or task step that keeps a loop this long (default {DEFAULT_THRESHOLD_MS:g})",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        type=_option_type(_autostart.check_pattern),
        metavar="PATTERN",
        help="only blame code matching this module name (myapp.db) or path (src/, */vendor/*); repeatable",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_option_type(_autostart.check_pattern),
        metavar="PATTERN",
        help="never blame code matching this module name or path; repeatable",
    )
    parser.add_argument(
        "--record",
        type=_option_type(_autostart.check_record_path),
        metavar="FILE",
        help="also write every episode to FILE, for `loopwatch report FILE` (a recording is started "
        "afresh; any other existing file is refused)",
    )
    parser.add_argument(
        "--no-report-stalls",
        dest="report_stalls",
        action="store_false",
        help="do not report a step while it still runs past the threshold (by default loopwatch's "
        "watchdog writes its stack to stderr at 1x, 10x and 100x the threshold)",
    )
    parser.add_argument(
        "--mode",
        type=_option_type(_autostart.check_mode),
        default="exact",
        metavar="MODE",
        help="exact (the default: a profile hook times every call) or sampling (the always-on mode, "
        "CPython 3.11+: no hook; each step timed from its start and end and blamed from the stack "
        "read while it ran)",
    )
    # The program's command line never reaches argparse (see split_command_line): the CLI puts
    # it here. The parser's own error() gives `main` the usual usage error (exit 2).
    parser.set_defaults(program=Program(), usage_error=parser.error)


def main(args: argparse.Namespace) -> int:
    program: Program = args.program
    usage_error: Callable[[str], NoReturn] = args.usage_error
    if not program.argv:
        usage_error("-m needs a module name" if program.module else "give a script to run, or -m module")
    settings = Settings(
        threshold_ms=args.threshold_ms,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        record=args.record,
        report_stalls=args.report_stalls,
        mode=args.mode,
    )
    name = program.argv[0]
    if not program.module:
        problem = _script_problem(name)
        if problem:
            return _fail(problem, EXIT_CANNOT_START)
    recorder: Optional[Recorder] = None
    if settings.record is not None:
        created = not os.path.lexists(settings.record)
        try:
            recorder = open_recorder(settings.record)  # refuses, untouched, a file that is no recording
        except RecordingError as error:
            return _fail(str(error), EXIT_CANNOT_START)
    # Monitoring starts before the module is looked up: finding it imports its packages, and uvloop
    # must be imported after loopwatch's wrap (see _autostart).
    _autostart.start(settings, announce=True)
    os.environ.update(settings.environment())
    if program.module:
        _set_path0(os.getcwd())  # as `python -m` does
        problem = _module_problem(name)
        if problem:
            _autostart.stop()
            if recorder is not None and created:
                _remove_quietly(recorder.path)
            return _fail(problem, EXIT_CANNOT_START)
    if recorder is not None:
        # Started afresh only now that the program is known to run: a typo keeps the last one.
        # This process's monitors add to it, and so do the processes the program starts.
        try:
            recorder.restart()
        except RecordingError as error:
            _autostart.stop()
            return _fail(str(error), EXIT_CANNOT_START)
    return _run(program)


def _fail(message: str, status: int) -> int:
    print(f"loopwatch run: {message}", file=sys.stderr)
    return status


def _script_problem(path: str) -> str:
    """Why `python path` would not start, in its words; "" when it would."""
    if path == "-":
        return "cannot run a program read from stdin; give a script file"
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "__main__.py")):
            return ""
        return f"can't find '__main__' module in {path!r}"
    try:
        with open(path, "rb"):
            return ""
    except OSError as error:
        return f"can't open file {os.path.abspath(path)!r}: [Errno {error.errno}] {error.strerror}"


def _module_problem(name: str) -> str:
    """Why `python -m name` would not start, in its words; "" when it would. Like python, this
    imports the module's parent packages."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is None:
            return f"No module named {name}"
        is_package = spec.submodule_search_locations is not None
        if is_package and importlib.util.find_spec(f"{name}.__main__") is None:  # it runs its __main__
            return f"No module named {name}.__main__; {name!r} is a package and cannot be directly executed"
    except (ImportError, ValueError) as error:
        return f"Error while finding module specification for {name!r} ({type(error).__name__}: {error})"
    return ""


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _set_path0(entry: Optional[str]) -> None:
    """Puts the program's own entry first on sys.path where the launcher's is (the `loopwatch`
    script's directory, or the current one for `python -m loopwatch`), as `python` would for the
    program; None just takes the launcher's away. With -P / PYTHONSAFEPATH python puts nothing
    there, and neither does this."""
    if getattr(sys.flags, "safe_path", False) or not sys.path:
        return
    if entry is None:
        del sys.path[0]
    else:
        sys.path[0] = entry


def _run(program: Program) -> int:
    """Runs the program in this process. SystemExit passes through, so that `sys.exit(3)` or
    `sys.exit("message")` ends loopwatch run as it would end python."""
    name, *arguments = program.argv
    sys.argv = [name, *arguments]  # for -m, run_module puts the module's file first, as python -m
    try:
        if program.module:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(name)
            if os.path.isfile(path) and not zipfile.is_zipfile(path):
                _set_path0(os.path.dirname(os.path.realpath(path)))
            else:
                _set_path0(None)  # run_path puts the directory or zip archive first itself
            runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except KeyboardInterrupt as error:
        _print_program_traceback(error)
        return EXIT_INTERRUPTED
    except Exception as error:
        _print_program_traceback(error)
        return EXIT_PROGRAM_ERROR
    return 0


def _print_program_traceback(error: BaseException) -> None:
    """Prints the program's uncaught exception as python would (through sys.excepthook, which the
    program may have set), without loopwatch's and runpy's frames in front of its own."""
    traceback = error.__traceback__
    # runpy's frames may come from a frozen module: tell them by module name, not by file.
    while traceback is not None and traceback.tb_frame.f_globals.get("__name__") in (__name__, "runpy"):
        traceback = traceback.tb_next
    error = error.with_traceback(traceback)  # the default hook prints this one, whatever it is given
    try:
        sys.excepthook(type(error), error, traceback)
    except Exception:
        sys.__excepthook__(type(error), error, traceback)
