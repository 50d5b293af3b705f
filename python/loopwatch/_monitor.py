"""The public monitor API: `EventLoopMonitor` and `event_loop_monitor_ctx`. Each thread has one
native hook, shared by every monitor active on the thread: it runs at the lowest of their
thresholds, and each monitor gets the episodes that cross its own."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar, cast

from loopwatch import _native, _stalls
from loopwatch._limits import (
    DEFAULT_REPORTS_PER_MINUTE,
    DEFAULT_THRESHOLD_MS,
    CulpritRateLimit,
    check_reports_per_minute,
)
from loopwatch._recording import PathArg, Recorder, open_recorder
from loopwatch._report import BlockingCallCallback, BlockingCallInfo
from loopwatch._stalls import StallCallback, StallInfo

__all__ = ["DEFAULT_EXCLUDES", "DEFAULT_THRESHOLD_MS", "EventLoopMonitor", "event_loop_monitor_ctx"]

logger = logging.getLogger("loopwatch")

MAX_PENDING_REPORTS = 1000
"""Reports waiting for the callbacks at most; more are dropped, counted and logged."""
DEFAULT_EXCLUDES: tuple[str, ...] = tuple(_native.DEFAULT_EXCLUDES)
"""Modules never blamed, whatever the filters say: loopwatch itself and the loop's machinery."""

F = TypeVar("F", bound=Callable[..., Any])


def _check_threshold(threshold_ms: object) -> float:
    if isinstance(threshold_ms, bool) or not isinstance(threshold_ms, (int, float)):
        raise TypeError(f"threshold_ms must be a number of milliseconds, got {type(threshold_ms).__name__}")
    value = float(threshold_ms)
    if math.isnan(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"threshold_ms must be > 0 and finite, got {threshold_ms!r}")
    return value


MODES = ("exact", "sampling")


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'exact' or 'sampling', got {mode!r}")
    if mode == "sampling" and not hasattr(_native, "ThreadSampler"):
        raise ValueError(
            "mode='sampling' needs CPython 3.11 or newer (it names a C call from the columns of its "
            f"call site, which code objects keep from 3.11); this is {sys.version_info.major}."
            f"{sys.version_info.minor}: use mode='exact'"
        )
    return mode


def _check_patterns(name: str, patterns: Optional[Iterable[str]]) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings, not a single string: use [{patterns!r}]")
    try:
        items = list(patterns)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings, got {type(patterns).__name__}") from None
    checked = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold strings, got {type(item).__name__}: {item!r}")
        try:
            _native.Filters([item], [])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        checked.append(_absolute_path_pattern(item))
    return checked


def _absolute_path_pattern(pattern: str) -> str:
    """Path patterns are matched against absolute file names: anchor relative ones at the current
    directory now, so that they mean what they meant when the monitor was built."""
    if ("/" not in pattern and os.sep not in pattern) or pattern.startswith(("*", "?", "[")):
        return pattern
    return os.path.abspath(os.path.expanduser(pattern)) + (os.sep if pattern.endswith(("/", os.sep)) else "")


def _new_native(mode: str) -> Any:
    """The native watch of one thread for `mode` (checked by `_check_mode`)."""
    if sys.version_info >= (3, 11) and mode == "sampling":
        return _native.ThreadSampler()
    return _native.ThreadMonitor()


class _ThreadHub:
    """The native hook of one thread and the monitors active on it, innermost last.

    Every active monitor gets every episode that crosses its threshold: a program's own monitor
    and one around the whole program (``loopwatch run``), or a request's, each see what is theirs.
    The innermost monitor's include/exclude patterns choose the culprit for all of them."""

    def __init__(self, mode: str = "exact") -> None:
        self.mode = mode
        self.native: Any = _new_native(mode)
        self.active: list[EventLoopMonitor] = []
        self.pid = os.getpid()
        """The process this hub saw last: another one is the child of a fork (see `_hub`)."""
        # Who gets what the hook reports: changed only after the hook has handed what the running
        # step blocked so far to the monitors that were active while it ran.
        self._recipients: tuple[EventLoopMonitor, ...] = ()
        _stalls.register_hub(threading.get_ident(), self)

    def deliver(self, raw: dict[str, Any]) -> None:
        """The native hook's sink: one episode, to each monitor active while it happened, innermost
        first; but once only to one destination (nested monitors that share a callback, or that
        all log, make one report)."""
        if self.pid != os.getpid():  # the parent's episode, found in a forked child: not the child's
            self.after_fork_in_child()
            return
        reached: list[object] = []
        if self._recipients:  # the innermost monitor's filters chose the culprit: its rule applies
            raw["include_given"] = bool(self._recipients[-1]._include_paths)
        for monitor in reversed(self._recipients):
            destination = monitor._destination()
            if destination not in reached and monitor._deliver(raw):
                reached.append(destination)

    def after_fork_in_child(self) -> None:
        """The child of a fork made on this thread starts from nothing: the parent's running step
        and the reports waiting for the parent's loop are the parent's, never the child's. Once
        per child, whichever comes first: loopwatch's at-fork handler, or the first use of the hub
        (asyncio's own at-fork handler, registered earlier, may stop a loop before ours runs)."""
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        if self.active:
            self.native.after_fork()
        for monitor in self.active:
            monitor._forget_pending()

    def change(self, active: list[EventLoopMonitor]) -> None:
        """Makes `active` the thread's monitors, installing, retuning or removing the hook."""
        if not active:
            if self.active and not self.native.uninstall():
                self._say_replaced()
        else:
            threshold_ms = min(monitor._threshold_ms for monitor in active)
            filters = active[-1]._filters
            if self.active and not self.native.installed:
                self.active = []  # the always-on mode could not start (said then): try again
            if self.active and not self.native.hooked and sys.getprofile() is None:
                # The program set a profile function of its own over ours and has since removed
                # it: take the thread back, afresh.
                self._say_replaced()
                self.native.uninstall()
                self.active = []
            stalls = [monitor for monitor in active if monitor._report_stalls]
            recordings = list(dict.fromkeys(m._recorder.file for m in stalls if m._recorder is not None))
            callbacks = any(monitor._on_stall is not None for monitor in stalls)
            if callbacks:
                _stalls.courier.ensure()
            destinations = (bool(stalls), recordings, callbacks)
            if self.active:
                self.native.reconfigure(threshold_ms, filters, self.deliver, *destinations)
            else:
                self._recipients = tuple(active)
                try:
                    self.native.install(threshold_ms, filters, self.deliver, *destinations)
                except RuntimeError as error:
                    self._recipients = ()
                    if self.mode != "sampling":
                        raise
                    # What keeps the always-on mode from watching is the machine's (no tool id
                    # left, stacks unreadable), never the program's fault: said, not raised.
                    _say_unwatched(str(error))
                except BaseException:
                    self._recipients = ()
                    raise
                _say_fallback(self.native.fallback)
                paused = self.native.paused_profiler
                if paused is not None:
                    logger.warning(
                        "loopwatch: the profile function already set on this thread (%r) gets no "
                        "events while loopwatch watches it; it is restored when loopwatch stops",
                        paused,
                    )
        self.active = active
        self._recipients = tuple(active)
        _watch_gc(self, bool(active))

    def deliver_stall(self, info: StallInfo) -> None:
        """A report of a stall still running on this hub's thread, from the courier thread: to
        each active monitor's ``on_stall``, once per callback."""
        called: list[object] = []
        for monitor in reversed(self._recipients):
            callback = monitor._on_stall
            if monitor._report_stalls and callback is not None and callback not in called:
                called.append(callback)
                monitor._call_on_stall(info)

    def _say_replaced(self) -> None:
        logger.warning(
            "loopwatch: a profile function the program set on this thread (sys.setprofile(), or a "
            "profiler that uses it) took the place of loopwatch's hook: what ran meanwhile was "
            "not watched"
        )


_fallback_said = False
_unwatched_said = False


def _say_unwatched(reason: str) -> None:
    """Says once per process why the always-on mode watches nothing."""
    global _unwatched_said
    if _unwatched_said:
        return
    _unwatched_said = True
    logger.warning("loopwatch: the always-on mode (mode='sampling') watches nothing here: %s", reason)


def _say_fallback(reason: Optional[str]) -> None:
    """Says once per process why the legacy profile hook watches where sys.monitoring would."""
    global _fallback_said
    if reason is None or _fallback_said:
        return
    _fallback_said = True
    logger.warning("loopwatch: watching through the legacy profile hook, not sys.monitoring: %s", reason)


_unseen_loop_said = False


def _say_if_loop_unseen() -> None:
    """Says once if the thread's running loop is one the always-on mode cannot see."""
    global _unseen_loop_said
    loop = asyncio._get_running_loop()
    if loop is None or isinstance(loop, asyncio.BaseEventLoop) or _unseen_loop_said:
        return
    if sys.version_info >= (3, 11) and _native.ThreadSampler.sees_c_loops():
        return
    _unseen_loop_said = True
    logger.warning(
        "loopwatch: the always-on mode (mode='sampling') sees asyncio's own loops only%s, and this "
        "thread runs a %s.%s: nothing it runs is reported; use mode='exact'",
        " before CPython 3.14" if sys.version_info < (3, 14) else "",
        type(loop).__module__,
        type(loop).__qualname__,
    )


_local = threading.local()
T = TypeVar("T")


def per_thread(name: str, make: Callable[[], T]) -> T:
    """The calling thread's `name` object, made on first use."""
    found: Optional[T] = getattr(_local, name, None)
    if found is None:
        found = make()
        setattr(_local, name, found)
    return found


def _hub(mode: str = "exact") -> _ThreadHub:
    """The calling thread's hub for monitors of `mode`: each mode has its own native watch."""
    if mode == "sampling":
        hub = per_thread("sampling_hub", lambda: _ThreadHub("sampling"))
    else:
        hub = per_thread("hub", _ThreadHub)
    hub.after_fork_in_child()  # nothing unless this is a forked child's first use
    return hub


def _after_fork_in_child() -> None:
    for name in ("hub", "sampling_hub"):
        hub: Optional[_ThreadHub] = getattr(_local, name, None)  # the thread that forked
        if hub is None:
            continue
        try:
            hub.after_fork_in_child()
        except Exception:  # never into the child's own code
            logger.exception("loopwatch could not start afresh in a forked child (this is a loopwatch bug)")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _AlsoAsync:
    """Makes a sync context manager usable with ``async with`` too: entering and leaving never
    await, so the async forms just call the sync ones."""

    def __enter__(self) -> Any:
        raise NotImplementedError

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_GC_WATCHERS: weakref.WeakSet[_ThreadHub] = weakref.WeakSet()
_GC_LOCK = threading.Lock()


def _watch_gc(hub: _ThreadHub, watching: bool) -> None:
    """Keeps loopwatch's callback in `gc.callbacks` while any thread is watched, and only then:
    it times each collection on the thread that runs it, so that a collection inside a step is
    not charged to the code it interrupted. Found by identity (a program's callbacks are never
    compared, so none of their code runs); one the program removed is simply not timed."""
    callback = _native._gc_callback
    with _GC_LOCK:
        if watching:
            _GC_WATCHERS.add(hub)
        else:
            _GC_WATCHERS.discard(hub)
        at = next((i for i, cb in enumerate(gc.callbacks) if cb is callback), None)
        if _GC_WATCHERS and at is None:
            gc.callbacks.append(callback)
        elif not _GC_WATCHERS and at is not None:
            del gc.callbacks[at]


def _judged_at(raw: dict[str, Any], threshold_ns: int) -> dict[str, Any]:
    """An episode the hook judged at a lower threshold (another monitor's), judged at this one:
    over it only for want of a CPU, it is starved; only because of garbage collections or waits
    for the GIL, those are the culprit (as the hook decides, see `loopwatch_core::gil`)."""
    own_ns = raw["duration_ns"] - raw["cpu_wait_ns"]
    raw = {**raw, "threshold_ns": threshold_ns, "starved": own_ns < threshold_ns}
    gc_ns = raw.get("gc_ns", 0)
    gil_ns = raw.get("gil_wait_ns", 0)
    waited = gc_ns + gil_ns
    judged = raw["kind"] not in ("gc", "gil")
    if judged and waited and own_ns >= threshold_ns and own_ns - waited < threshold_ns:
        if gil_ns > gc_ns:
            kind, name, took = "gil", _gil_culprit_name(raw.get("gil_holders", ())), gil_ns
        else:
            generation = raw.get("gc_generation")
            kind, took = "gc", gc_ns
            name = "garbage collection"
            if generation is not None:
                name += f" (generation {generation})"
        stack = [*raw["stack"][: raw["culprit"] + 1], (name, None, None, None, took, False, False, True)]
        raw.update(kind=kind, stack=stack, culprit=len(stack) - 1)
    return raw


def _gil_culprit_name(holders: Sequence[tuple[int, Optional[str], int, Optional[str]]]) -> str:
    """As `loopwatch_core::gil::gil_culprit_name` names a wait for the GIL."""
    if not holders:
        return "waiting for the GIL"
    ident, name, _, _ = holders[0]
    if name is not None:
        thread = f"thread {json.dumps(name, ensure_ascii=False)}"
    else:
        thread = f"thread {ident}" if ident else "another thread"
    others = len(holders) - 1
    more = "" if not others else " and 1 other" if others == 1 else f" and {others} others"
    return f"waiting for the GIL (held by {thread}{more})"


class _StarvedSteps:
    """Steps over the threshold only because the loop's thread waited for a CPU: no code is to
    blame, so they reach no callback; they are counted and logged at most once a minute."""

    LOG_EVERY_S = 60.0

    def __init__(self) -> None:
        self.count = 0
        self.longest_wait_ms = 0.0
        self._logged_at = -math.inf

    def add(self, raw: dict[str, Any]) -> None:
        self.count += 1
        self.longest_wait_ms = max(self.longest_wait_ms, raw["cpu_wait_ns"] / 1e6)

    def log_now_and_then(self, threshold_ms: float) -> None:
        if not self.count or time.monotonic() - self._logged_at < self.LOG_EVERY_S:
            return
        logger.warning(
            "loopwatch: the event loop's thread got no CPU: %s over %g ms only for want of one (waits up to "
            "%.1f ms); the machine is busy, no code is blamed",
            "1 step ran" if self.count == 1 else f"{self.count} steps ran",
            threshold_ms,
            self.longest_wait_ms,
        )
        self._logged_at = time.monotonic()
        self.count = 0
        self.longest_wait_ms = 0.0


class EventLoopMonitor(_AlsoAsync):
    """Reports synchronous code that blocks the event loop on the threads it is activated on.

    Args:
        threshold_ms: a callback or task step that keeps the loop for at least this long is
            reported.
        include_paths: if given, only frames matching one of these patterns may be blamed.
        exclude_paths: frames matching these patterns are never blamed (in addition to
            ``DEFAULT_EXCLUDES``).
        on_blocking_call: called with a ``BlockingCallInfo`` for each episode; by default each
            episode is logged as a WARNING on the ``loopwatch`` logger.
        reports_per_minute: at most this many reports per culprit per minute; the rest are
            held back and counted in the next report's ``suppressed``. ``None``: no limit.
        record_to: a file that every report is added to, rate limit or not, for
            ``loopwatch report`` (see `loopwatch._recording`). Created if missing; added to if it
            is already a recording; `RecordingError` if it cannot be written.
        on_stall: called with a `StallInfo` for each report of a step still running (below),
            from a thread of loopwatch's own as soon as it can have the GIL; the step's report
            when it ends goes to ``on_blocking_call`` as usual.
        report_stalls: a step still running past the threshold is reported while it runs, at
            1x, 10x, 100x... the threshold: loopwatch's watchdog thread reads the loop thread's
            Python stack and writes it to stderr itself, so the report gets out even while a C
            call holds the GIL or never returns; and adds them to ``record_to``, so a recording
            shows a step that never ended. The report made when the step ends says how many times
            (``reports_while_running``). ``False``: only that final report.
        mode: ``"exact"`` (the default) times every call on the loop's thread with a profile hook:
            the exact culprit and its own duration, at the cost of any profile hook. ``"sampling"``
            (the always-on mode, CPython 3.11+; asyncio's own loops, and uvloop's from 3.14)
            installs no hook: each callback or task step is timed from its start and end, and one
            that runs past the threshold is blamed from the loop thread's stack as loopwatch's
            watchdog read it while it ran (at half the threshold, at the threshold, then at 10x,
            100x...): its duration is exact, its culprit is what the stack showed then (for a C
            call, the function named at its call site), and every frame is given the whole
            duration.

    A pattern is a module name (``myapp``, ``myapp.db``: the module and everything in it), or a
    file path if it contains a ``/`` (a directory and everything under it). ``*``, ``?`` and
    ``[...]`` make a glob over the whole module-qualified name or path (``*/site-packages/*``).
    The culprit is the deepest frame that may be blamed; an episode with none is dropped.
    A step over the threshold only because the thread waited for a CPU (Linux) blames no code:
    it is counted and logged at most once a minute instead.
    """

    def __init__(
        self,
        threshold_ms: float = DEFAULT_THRESHOLD_MS,
        include_paths: Optional[Iterable[str]] = None,
        exclude_paths: Optional[Iterable[str]] = None,
        on_blocking_call: Optional[BlockingCallCallback] = None,
        reports_per_minute: Optional[int] = DEFAULT_REPORTS_PER_MINUTE,
        record_to: Optional[PathArg] = None,
        report_stalls: bool = True,
        on_stall: Optional[StallCallback] = None,
        mode: str = "exact",
    ) -> None:
        self._threshold_ms = _check_threshold(threshold_ms)
        self._mode = _check_mode(mode)
        if not isinstance(report_stalls, bool):
            raise TypeError(f"report_stalls must be True or False, got {type(report_stalls).__name__}")
        self._report_stalls = report_stalls
        if on_stall is not None and not callable(on_stall):
            raise TypeError(f"on_stall must be callable, got {type(on_stall).__name__}")
        self._on_stall = on_stall
        self._stall_callback_failures = 0
        self._reports_per_minute = check_reports_per_minute(reports_per_minute)
        self._rate_limit = CulpritRateLimit(reports_per_minute) if reports_per_minute is not None else None
        self._include_paths = _check_patterns("include_paths", include_paths)
        self._exclude_paths = _check_patterns("exclude_paths", exclude_paths)
        if on_blocking_call is not None and not callable(on_blocking_call):
            raise TypeError(f"on_blocking_call must be callable, got {type(on_blocking_call).__name__}")
        self._on_blocking_call = on_blocking_call
        self._recorder: Optional[Recorder] = open_recorder(record_to) if record_to is not None else None
        self._filters = _native.Filters(self._include_paths, self._exclude_paths)
        self._threads: set[int] = set()
        self._callback_failures = 0
        # Reports wait here (with the time they were found) between the hook and the callbacks.
        self._pending: deque[tuple[dict[str, Any], float]] = deque()
        self._dropped = 0
        self._drain_scheduled = False
        self._starved = _StarvedSteps()

    @property
    def threshold_ms(self) -> float:
        return self._threshold_ms

    @property
    def is_active(self) -> bool:
        """Whether this monitor is active on the calling thread."""
        return threading.get_ident() in self._threads

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"sampling"`` (see the class)."""
        return self._mode

    def activate(self) -> None:
        """Starts monitoring the calling thread (a no-op if already active on it)."""
        hub = _hub(self._mode)
        if self._mode == "sampling":
            _say_if_loop_unseen()
        if self in hub.active:
            return
        if self._recorder is not None and self._report_stalls:
            # Before the watchdog adds its first record of a stall, the file says who writes.
            self._recorder.start_session()
        hub.change([*hub.active, self])
        self._threads.add(threading.get_ident())

    def deactivate(self) -> None:
        """Stops monitoring the calling thread. What the running step blocked so far is reported
        first; then the other monitors active on the thread go on, or the profile function that
        was there before the first activation is restored."""
        hub = _hub(self._mode)
        self._threads.discard(threading.get_ident())
        if self not in hub.active:
            return
        hub.change([monitor for monitor in hub.active if monitor is not self])
        # Whatever is still waiting is delivered before deactivate() returns.
        self._drain()
        if self._callback_failures > 1:
            logger.error("loopwatch: on_blocking_call raised %d more times", self._callback_failures - 1)
        self._callback_failures = 0

    def __enter__(self) -> EventLoopMonitor:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.deactivate()

    def _flush(self) -> None:
        """Delivers, before it returns, every episode up to now: also what the running step has
        blocked so far, which is then reported as an episode of its own (the rest of the step is
        judged afresh). For a reader that must not miss a block that ended a moment ago."""
        if not self.is_active:
            return
        _hub(self._mode).native.flush()
        self._drain()

    def _forget_pending(self) -> None:
        """In a forked child: the reports waiting here are the parent's, to be delivered there."""
        self._pending.clear()
        self._dropped = 0
        self._drain_scheduled = False
        self._starved = _StarvedSteps()

    def _destination(self) -> object:
        """Where this monitor's reports end up: its callback and its recording."""
        return (self._on_blocking_call, self._recorder)

    def _deliver(self, raw: dict[str, Any]) -> bool:
        """Receives one episode from the native hook, at the end of the blocking step. The
        callbacks run right after, as a loop callback of their own (in the blocked task's
        context), so that a slow one never lengthens the step it reports; where no loop runs
        they run at once. At most `MAX_PENDING_REPORTS` wait. Whether it takes the episode (one
        under its threshold is for another monitor). Never raises."""
        if self._on_stall is not None and self._report_stalls:
            _stalls.courier.ensure()  # gone since a fork
        threshold_ns = round(self._threshold_ms * 1e6)
        if raw["duration_ns"] < threshold_ns:
            return False
        if raw["threshold_ns"] != threshold_ns:
            raw = _judged_at(raw, threshold_ns)
        if len(self._pending) >= MAX_PENDING_REPORTS:
            self._dropped += 1
            return True
        self._pending.append((raw, time.time()))
        if self._drain_scheduled:
            return True
        loop = asyncio._get_running_loop()
        if loop is not None:
            try:
                loop.call_soon(self._drain)
                self._drain_scheduled = True
                return True
            except RuntimeError:  # the loop is closing
                pass
        self._drain()
        return True

    def _drain(self) -> None:
        """Hands every waiting report to the callbacks, with the hook paused: the callbacks are
        loopwatch's work, not the program's. Never raises."""
        self._drain_scheduled = False
        if not self._pending and not self._dropped:
            return
        native = _hub(self._mode).native
        was_paused = native.set_paused(True)
        try:
            while self._pending:
                raw, found_at = self._pending.popleft()
                if raw.get("starved"):
                    self._starved.add(raw)
                    continue
                try:
                    info = BlockingCallInfo._from_native(raw, found_at)
                except Exception:
                    logger.exception("loopwatch could not build a report (this is a loopwatch bug)")
                    continue
                self._dispatch(info)
            if self._dropped:
                logger.warning(
                    "loopwatch dropped %d reports: more than %d were waiting for on_blocking_call",
                    self._dropped,
                    MAX_PENDING_REPORTS,
                )
                self._dropped = 0
            self._starved.log_now_and_then(self._threshold_ms)
        finally:
            native.set_paused(was_paused)

    def _checked_settings(self) -> dict[str, Any]:
        """This monitor's arguments as checked: what makes more monitors like it. (An iterator of
        patterns can only be read once, and relative paths were anchored when it was built.)"""
        return {
            "threshold_ms": self._threshold_ms,
            "include_paths": self._include_paths,
            "exclude_paths": self._exclude_paths,
            "on_blocking_call": self._on_blocking_call,
            "reports_per_minute": self._reports_per_minute,
            "record_to": self._recorder.path if self._recorder is not None else None,
            "report_stalls": self._report_stalls,
            "on_stall": self._on_stall,
            "mode": self._mode,
        }

    def _call_on_stall(self, info: StallInfo) -> None:
        """Hands a report of a running stall to ``on_stall``. Never raises."""
        assert self._on_stall is not None
        try:
            self._on_stall(info)
        except Exception:
            self._stall_callback_failures += 1
            if self._stall_callback_failures == 1:
                logger.exception(
                    "on_stall raised; monitoring goes on (further failures are counted, not logged)"
                )

    def _dispatch(self, info: BlockingCallInfo) -> None:
        """Records a report, then hands it to the callback, or logs it, within the rate limit.
        Never raises."""
        if self._recorder is not None:
            self._recorder.write(info)
        if self._rate_limit is not None:
            held_back = self._rate_limit.admit((info.method_name, info.kind))
            if held_back is None:
                return
            if held_back:
                info = dataclasses.replace(info, suppressed=held_back)
        if self._on_blocking_call is None:
            logger.warning("%s", info.format(max_frames=6), extra={"loopwatch": info})
            return
        try:
            self._on_blocking_call(info)
        except Exception:
            self._callback_failures += 1
            if self._callback_failures == 1:
                logger.exception(
                    "on_blocking_call raised; monitoring goes on (further failures are counted, not logged)"
                )


class _MonitorContext(_AlsoAsync):
    """What `event_loop_monitor_ctx` returns: a sync and async context manager and a decorator.
    Each entry (or decorated call) activates a monitor of its own, so it nests and re-enters."""

    def __init__(self, enabled: bool, settings: dict[str, Any]) -> None:
        self._enabled = enabled
        # Validate now, where the mistake was made; keep the checked values (an iterator of
        # patterns can only be read once, relative paths are anchored now).
        self._settings = EventLoopMonitor(**settings)._checked_settings()
        self._entered: list[Optional[EventLoopMonitor]] = []

    def _new_monitor(self) -> Optional[EventLoopMonitor]:
        return EventLoopMonitor(**self._settings) if self._enabled else None

    def __enter__(self) -> Optional[EventLoopMonitor]:
        monitor = self._new_monitor()
        if monitor is not None:
            monitor.activate()
        self._entered.append(monitor)
        return monitor

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        monitor = self._entered.pop()
        if monitor is not None:
            monitor.deactivate()

    def __call__(self, func: F) -> F:
        """Decorates a function so that each call runs monitored; for an ``async def`` that means
        the whole coroutine, from its first step to its last."""
        if inspect.isasyncgenfunction(func):
            raise TypeError("event_loop_monitor_ctx cannot decorate an async generator function")
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def monitored_coroutine(*args: Any, **kwargs: Any) -> Any:
                monitor = self._new_monitor()
                if monitor is None:
                    return await cast(Callable[..., Awaitable[Any]], func)(*args, **kwargs)
                with monitor:
                    return await cast(Callable[..., Awaitable[Any]], func)(*args, **kwargs)

            return cast(F, monitored_coroutine)

        @functools.wraps(func)
        def monitored(*args: Any, **kwargs: Any) -> Any:
            monitor = self._new_monitor()
            if monitor is None:
                return func(*args, **kwargs)
            with monitor:
                return func(*args, **kwargs)

        return cast(F, monitored)


def event_loop_monitor_ctx(
    enabled: bool = True,
    threshold_ms: float = DEFAULT_THRESHOLD_MS,
    include_paths: Optional[Iterable[str]] = None,
    exclude_paths: Optional[Iterable[str]] = None,
    on_blocking_call: Optional[BlockingCallCallback] = None,
    reports_per_minute: Optional[int] = DEFAULT_REPORTS_PER_MINUTE,
    record_to: Optional[PathArg] = None,
    report_stalls: bool = True,
    on_stall: Optional[StallCallback] = None,
    mode: str = "exact",
) -> _MonitorContext:
    """Monitors the event loop of the current thread while the block (or decorated function) runs.

    Use it as ``with``, ``async with``, or as a decorator on a sync or ``async def`` function.
    ``enabled=False`` turns it into a no-op. See `EventLoopMonitor` for the other arguments.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__}")
    settings: dict[str, Any] = {
        "threshold_ms": threshold_ms,
        "include_paths": include_paths,
        "exclude_paths": exclude_paths,
        "on_blocking_call": on_blocking_call,
        "reports_per_minute": reports_per_minute,
        "record_to": record_to,
        "report_stalls": report_stalls,
        "on_stall": on_stall,
        "mode": mode,
    }
    return _MonitorContext(enabled, settings)
