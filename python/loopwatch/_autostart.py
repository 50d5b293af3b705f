"""Whole-program monitoring: every asyncio event loop the program runs, on any thread, is monitored
while it runs, and each report is printed to stderr. Started by `loopwatch run`, or by the
`loopwatch_autostart.pth` file in site-packages when the environment says ``LOOPWATCH=1``.

How: asyncio's loops (the default ones and uvloop's) call ``asyncio._set_running_loop(loop)`` on the
loop's own thread when they start running and ``_set_running_loop(None)`` when they stop. Wrapping
that function gives one well-defined moment, on the right thread, to activate a monitor and to
deactivate it. uvloop captures the function when it is imported, so the wrap must come first.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import atexit
import dataclasses
import functools
import math
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar

from loopwatch import _native
from loopwatch._limits import DEFAULT_REPORTS_PER_MINUTE, MAX_CULPRITS, CulpritRateLimit
from loopwatch._monitor import DEFAULT_THRESHOLD_MS, EventLoopMonitor, _absolute_path_pattern, _check_mode
from loopwatch._recording import RecordingError
from loopwatch._report import BlockingCallInfo

# The environment: how `loopwatch run` hands its settings to the processes the program starts,
# and how a program started by another tool is monitored without changing it.
ENV_ENABLED = "LOOPWATCH"
ENV_THRESHOLD_MS = "LOOPWATCH_THRESHOLD_MS"
ENV_INCLUDE = "LOOPWATCH_INCLUDE"
ENV_EXCLUDE = "LOOPWATCH_EXCLUDE"
ENV_RECORD = "LOOPWATCH_RECORD"
ENV_REPORT_STALLS = "LOOPWATCH_REPORT_STALLS"
ENV_MODE = "LOOPWATCH_MODE"
PATTERN_SEPARATOR = ","
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")

SUMMARY_MAX_CULPRITS = 10
T = TypeVar("T")


class SettingsError(ValueError):
    """A setting a user gave (an option or an environment variable) is wrong; the message is one
    line, worded for them."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to monitor, checked: the same for every process of one run."""

    threshold_ms: float = DEFAULT_THRESHOLD_MS
    include: tuple[str, ...] = ()
    """Patterns as checked: relative paths are already anchored, so that a child process started
    in another directory reads them the same way."""
    exclude: tuple[str, ...] = ()
    record: Optional[str] = None
    """An absolute path, or None."""
    report_stalls: bool = True
    """Whether a step still running past the threshold is reported while it runs."""
    mode: str = "exact"
    """``"exact"`` or ``"sampling"`` (the always-on mode); see `EventLoopMonitor`."""

    def environment(self) -> dict[str, str]:
        """The variables that make a Python process started with them monitored the same way."""
        return {
            ENV_ENABLED: "1",
            ENV_THRESHOLD_MS: repr(self.threshold_ms),
            ENV_INCLUDE: PATTERN_SEPARATOR.join(self.include),
            ENV_EXCLUDE: PATTERN_SEPARATOR.join(self.exclude),
            ENV_RECORD: self.record or "",
            ENV_REPORT_STALLS: "1" if self.report_stalls else "0",
            ENV_MODE: self.mode,
        }


# Each check words its complaint for a prefix naming the setting: "--threshold-ms: ..." or
# "LOOPWATCH_THRESHOLD_MS: ...".


def parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"must be a number of milliseconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"must be a number of milliseconds > 0, got {text!r}")
    return value


def check_pattern(text: str) -> str:
    """An include/exclude pattern as the monitor will use it (relative paths anchored at the
    current directory, so that a process started elsewhere reads it the same way)."""
    try:
        _native.Filters([text], [])
    except ValueError as error:
        raise SettingsError(str(error)) from None
    return _absolute_path_pattern(text)


def check_record_path(text: str) -> str:
    if not text.strip():
        raise SettingsError("must be a file name, got an empty one")
    return os.path.abspath(os.path.expanduser(text))


def check_mode(text: str) -> str:
    """The mode a user named, checked as the monitor checks it (3.11+ for "sampling")."""
    try:
        return _check_mode(text)
    except ValueError as error:
        raise SettingsError(str(error).replace("mode='sampling'", "sampling")) from None


def _named(name: str, check: Callable[[str], T], text: str) -> T:
    try:
        return check(text)
    except SettingsError as error:
        raise SettingsError(f"{name}: {error}") from None


def settings_from_environment(environ: Mapping[str, str]) -> Optional[Settings]:
    """The settings the environment asks for, or None when it does not ask for monitoring."""
    enabled = environ.get(ENV_ENABLED, "").strip().lower()
    if enabled in _OFF:
        return None
    if enabled not in _ON:
        raise SettingsError(f"{ENV_ENABLED}: must be 1 (on) or 0 (off), got {environ[ENV_ENABLED]!r}")
    threshold = environ.get(ENV_THRESHOLD_MS, "").strip()
    record = environ.get(ENV_RECORD, "")
    stalls = environ.get(ENV_REPORT_STALLS, "1").strip().lower()
    if stalls not in _ON and stalls not in _OFF:
        raise SettingsError(
            f"{ENV_REPORT_STALLS}: must be 1 (on) or 0 (off), got {environ[ENV_REPORT_STALLS]!r}"
        )
    return Settings(
        threshold_ms=_named(ENV_THRESHOLD_MS, parse_threshold, threshold)
        if threshold
        else DEFAULT_THRESHOLD_MS,
        include=_patterns_from_environment(environ, ENV_INCLUDE),
        exclude=_patterns_from_environment(environ, ENV_EXCLUDE),
        record=_named(ENV_RECORD, check_record_path, record) if record else None,
        report_stalls=stalls in _ON,
        mode=_named(ENV_MODE, check_mode, environ.get(ENV_MODE, "exact").strip() or "exact"),
    )


def _patterns_from_environment(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    items = [item.strip() for item in environ.get(name, "").split(PATTERN_SEPARATOR)]
    return tuple(_named(name, check_pattern, item) for item in items if item)


_output: Optional[Callable[[str], None]] = None
"""Where reports go instead of stderr, when the program has a better place for them (pytest's
terminal, which its capture of stderr would otherwise hide); see `set_output`."""


def set_output(write: Optional[Callable[[str], None]]) -> None:
    """Sends every line loopwatch prints to `write` (one line a call, no newline); None: back to
    stderr. Should `write` fail, the line goes to stderr."""
    global _output
    _output = write


def is_running() -> bool:
    """Whether whole-program monitoring runs in this process."""
    return _program is not None


def _write(text: str) -> None:
    """Prints to the program's stderr, whatever its logging setup; never raises."""
    output = _output
    if output is not None:
        try:
            output(text)
            return
        except Exception:
            pass
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            stream.write(text + "\n")
            stream.flush()
            return
        except Exception:  # closed or broken by the program: try the original
            continue


@dataclasses.dataclass
class _Tally:
    episodes: int = 0
    worst_ms: float = 0.0
    where: str = ""
    """The worst episode's line in the user's code (`BlockingCallInfo.where`)."""
    via: Optional[str] = None


class _Reporter:
    """The monitor's callback: prints each report (at most `DEFAULT_REPORTS_PER_MINUTE` per culprit
    a minute) and counts every episode for the summary at exit. Called on the loops' threads."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._rate_limit = CulpritRateLimit(DEFAULT_REPORTS_PER_MINUTE)
        self.tallies: dict[tuple[str, str], _Tally] = {}
        self.untallied = 0
        """Episodes of culprits beyond the first `MAX_CULPRITS`: counted, not named."""

    def __call__(self, info: BlockingCallInfo) -> None:
        culprit = (info.method_name, info.kind)
        with self._lock:
            tally = self.tallies.get(culprit)
            if tally is None and len(self.tallies) < MAX_CULPRITS:
                tally = self.tallies[culprit] = _Tally()
            if tally is None:
                self.untallied += 1
            else:
                tally.episodes += 1
                if info.blamed_ms > tally.worst_ms:
                    tally.worst_ms, tally.where = info.blamed_ms, info.where
                    tally.via = info.via
            held_back = self._rate_limit.admit(culprit)
        if held_back is None:
            return
        if held_back:
            info = dataclasses.replace(info, suppressed=held_back)
        _write(self.prefix + info.format(max_frames=6))

    def reset(self) -> None:
        """Forgets what the parent counted (in a child made by fork)."""
        with self._lock:
            self.tallies.clear()
            self.untallied = 0
            self._rate_limit = CulpritRateLimit(DEFAULT_REPORTS_PER_MINUTE)


class _WholeProgram:
    """The running state of whole-program monitoring in this process."""

    def __init__(self, settings: Settings, announce: bool) -> None:
        self.settings = settings
        self.announce = announce
        self.reporter = _Reporter("loopwatch: " if announce else f"loopwatch[{os.getpid()}]: ")
        self.monitor = self._new_monitor()
        self.loops_started = 0
        self.activation_failed = False

    def _new_monitor(self) -> EventLoopMonitor:
        options: dict[str, Any] = {
            "threshold_ms": self.settings.threshold_ms,
            "include_paths": list(self.settings.include),
            "exclude_paths": list(self.settings.exclude),
            "on_blocking_call": self.reporter,
            # The reporter applies the limit itself, so that it still counts every episode.
            "reports_per_minute": None,
            "report_stalls": self.settings.report_stalls,
            "mode": self.settings.mode,
        }
        if self.settings.record is not None:
            options["record_to"] = self.settings.record
        return EventLoopMonitor(**options)

    def loop_changed(self, loop: Optional[object]) -> None:
        """Runs on a loop's thread right after the loop became its running loop (or stopped
        being it). Never raises: a fault here must not reach the program's loop."""
        try:
            active: Optional[EventLoopMonitor] = getattr(_running, "monitor", None)
            if loop is None:
                if active is not None:
                    _running.monitor = None
                    active.deactivate()
            elif active is None:
                self.monitor.activate()
                _running.monitor = self.monitor
                self.loops_started += 1
        except Exception as error:
            if not self.activation_failed:
                self.activation_failed = True
                _write(
                    f"loopwatch: could not monitor an event loop ({_one_line(error)}); the program goes on"
                )

    def after_fork_in_child(self) -> None:
        """A forked child is one more process the program started: it counts its own episodes
        and says which process it is."""
        self.reporter.reset()
        self.reporter.prefix = f"loopwatch[{os.getpid()}]: "
        self.announce = False
        self.loops_started = 0

    def summary(self) -> list[str]:
        """What to print at exit: the culprits, worst first, and where the recording is."""
        settings, reporter = self.settings, self.reporter
        head = reporter.prefix
        lines = []
        with reporter._lock:
            tallies = sorted(reporter.tallies.items(), key=lambda item: -item[1].worst_ms)
            untallied = reporter.untallied
        episodes = sum(tally.episodes for _, tally in tallies) + untallied
        if episodes:
            lines.append(
                f"{head}{_plural(episodes, 'blocking episode')} of {settings.threshold_ms:g} ms or more, "
                f"{_plural(len(tallies), 'culprit')}:"
            )
            width = len(str(max(tally.episodes for _, tally in tallies))) if tallies else 1
            for (name, kind), tally in tallies[:SUMMARY_MAX_CULPRITS]:
                what = name if kind == "call" else f"{name} ({kind})"
                if tally.via:
                    what += f" (via {tally.via})"
                lines.append(
                    f"  {tally.episodes:>{width}}x  worst {tally.worst_ms:7.1f} ms  {what}  at {tally.where}"
                )
            if len(tallies) > SUMMARY_MAX_CULPRITS or untallied:
                more = sum(t.episodes for _, t in tallies[SUMMARY_MAX_CULPRITS:]) + untallied
                lines.append(f"  ... and {_plural(more, 'more episode')} of other culprits")
        elif self.announce:
            # Only about this process: the ones it started said their own.
            if self.loops_started:
                lines.append(
                    f"{head}nothing blocked an event loop of this process "
                    f"for {settings.threshold_ms:g} ms or more"
                )
            else:
                lines.append(f"{head}this process ran no asyncio event loop")
        if settings.record is not None and (episodes or self.announce):
            lines.append(
                f"{head}recorded to {settings.record}; summarize it with: loopwatch report {settings.record}"
            )
        return lines

    def print_summary(self) -> None:
        try:
            for line in self.summary():
                _write(line)
        except Exception as error:  # never let loopwatch's own exit handler fail the program's exit
            _write(f"loopwatch: no summary ({_one_line(error)})")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, RecordingError) and text:  # already worded for a person
        return text[0]
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


_program: Optional[_WholeProgram] = None
_wrapped: Optional[Callable[[Any], None]] = None
_exit_hooks_registered = False
_environment_read = False
# The monitor activated on each thread when its loop started: the loop stops with that one, even
# if `start` replaced the settings meanwhile.
_running = threading.local()


def _wrap_set_running_loop() -> None:
    """Puts loopwatch between asyncio's loops and ``_set_running_loop``, once per process."""
    global _wrapped
    if _wrapped is not None:
        return
    original = asyncio.events._set_running_loop

    @functools.wraps(original)
    def _set_running_loop(loop: Any) -> None:
        original(loop)
        program = _program
        if program is not None:
            program.loop_changed(loop)

    if "uvloop.loop" in sys.modules:
        _write(
            "loopwatch: uvloop was imported before loopwatch started; its loops will not be "
            "monitored in this process"
        )
    # base_events reads `events._set_running_loop` at each call; uvloop reads `asyncio._...` once.
    asyncio.events._set_running_loop = _set_running_loop
    asyncio._set_running_loop = _set_running_loop
    _wrapped = _set_running_loop


def start(settings: Settings, *, announce: bool) -> bool:
    """Monitors every event loop this process runs from now on, with these settings (replacing
    earlier ones: `loopwatch run` wins over an inherited environment). `announce`: this is the
    process the user started with `loopwatch run`, which always ends with a summary line.
    Returns False, after one line on stderr, if monitoring could not start."""
    global _program, _exit_hooks_registered
    try:
        program = _WholeProgram(settings, announce)
        _wrap_set_running_loop()
    except Exception as error:
        _write(f"loopwatch: not monitoring ({_one_line(error)}); the program goes on")
        return False
    _program = program
    if not _exit_hooks_registered:
        _exit_hooks_registered = True
        atexit.register(_print_summary)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
    return True


def stop() -> None:
    """Monitors no loop that starts from now on and prints no summary (the program never ran).
    The wrap stays in place, inert: uvloop may hold it already."""
    global _program
    _program = None


def _print_summary() -> None:
    if _program is not None:
        _program.print_summary()


def _after_fork_in_child() -> None:
    if _program is not None:
        _program.after_fork_in_child()


def start_from_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """What the .pth file calls at interpreter start-up when ``LOOPWATCH`` is set. A bad value
    prints one line and leaves monitoring off; the program runs either way. Never raises."""
    global _environment_read
    # In a venv, site runs the .pth lines of its site-packages twice (once for the venv, once
    # more with the prefixes): act on the first.
    if _environment_read:
        return
    _environment_read = True
    try:
        settings = settings_from_environment(os.environ if environ is None else environ)
    except SettingsError as error:
        _write(f"loopwatch: {error}; not monitoring")
        return
    except Exception as error:
        _write(f"loopwatch: not monitoring ({_one_line(error)})")
        return
    if settings is not None:
        start(settings, announce=False)
