"""Monitoring one task at a time (a request, a job): the hook is on only while a scope is open on
the thread, and each episode goes to the scope whose task (or a task it spawned) it blocked.

The scope lives in a context variable that the native hook reads when an episode is found, so a
report can never reach another scope's callback, however the loop interleaves their tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from contextvars import Token
from types import TracebackType
from typing import Any, Optional

from loopwatch import _native
from loopwatch._limits import DEFAULT_REPORTS_PER_MINUTE
from loopwatch._monitor import DEFAULT_THRESHOLD_MS, EventLoopMonitor, _AlsoAsync, per_thread
from loopwatch._recording import PathArg
from loopwatch._report import BlockingCallCallback, BlockingCallInfo
from loopwatch._stalls import StallCallback


class _ScopeHub:
    """The scopes open on one thread and the one monitor that serves them all."""

    def __init__(self) -> None:
        self.open: dict[int, TaskScope] = {}
        # Scopes left during the step that is running: that step's episode, found when it ends,
        # is still theirs.
        self.closing: dict[int, TaskScope] = {}
        self.monitor: Optional[EventLoopMonitor] = None

    def enter(self, scope: TaskScope) -> None:
        settings = scope._settings
        if self.monitor is None:
            self.monitor = self._new_monitor(settings)
            self.monitor.activate()
        elif settings.threshold_ms < self.monitor.threshold_ms:
            # The lowest threshold serves every scope; each still gets only what crosses its own.
            lower = self._new_monitor(settings, like=self.monitor)
            lower.activate()
            self.monitor.deactivate()
            self.monitor = lower
        self.open[id(scope)] = scope

    def exit(self, scope: TaskScope) -> None:
        if len(self.open) == 1 and self.monitor is not None:
            # Deactivating reports what the running step blocked so far: route it while the
            # scope is still open.
            self.monitor.deactivate()
            self.monitor = None
            self.open.pop(id(scope), None)
            return
        if self.monitor is not None and self.monitor.mode == "sampling":
            # The always-on mode learns a step's scope only when the step ends, by then out of
            # the scope: what the step blocked so far is reported now, still inside it.
            self.monitor._flush()
        self.open.pop(id(scope), None)
        # The hook stays on for the other scopes: this step's episode arrives when the step
        # ends, before the loop runs anything else.
        self.closing[id(scope)] = scope
        # Two hops: the step's reports are delivered by a loop callback that the step's end
        # schedules, after this one.
        loop = asyncio.get_running_loop()

        def forget() -> None:
            self.closing.pop(id(scope), None)

        loop.call_soon(loop.call_soon, forget)

    def _new_monitor(
        self, settings: EventLoopMonitor, like: Optional[EventLoopMonitor] = None
    ) -> EventLoopMonitor:
        paths = like if like is not None else settings
        return EventLoopMonitor(
            threshold_ms=settings.threshold_ms,
            include_paths=paths._include_paths,
            exclude_paths=paths._exclude_paths,
            on_blocking_call=self._route,
            reports_per_minute=None,  # each scope applies its own
            report_stalls=settings._report_stalls,
            on_stall=settings._on_stall,
            mode=settings.mode,
        )

    def _route(self, info: BlockingCallInfo) -> None:
        scope = None
        if info._scope is not None:
            scope = self.open.get(info._scope) or self.closing.get(info._scope)
        if scope is None or info.duration_ms < scope._settings.threshold_ms:
            return  # not a monitored task's episode, or under this scope's own threshold
        scope._settings._dispatch(dataclasses.replace(info, context=scope.context))


def _hub(mode: str) -> _ScopeHub:
    """The calling thread's scopes of `mode`: each mode watches its own, with its own monitor."""
    return per_thread(f"scope_hub_{mode}", _ScopeHub)


class TaskScope(_AlsoAsync):
    """What `monitor_current_task` returns: a context manager (``with`` or ``async with``) that
    monitors the task it is entered in, and the tasks that task creates meanwhile."""

    def __init__(self, settings: EventLoopMonitor, context: Optional[Mapping[str, Any]]) -> None:
        self._settings = settings
        self.context: Optional[Mapping[str, Any]] = dict(context) if context is not None else None
        self._token: Optional[Token[Any]] = None

    def __enter__(self) -> TaskScope:
        if self._token is not None:
            raise RuntimeError("this monitor_current_task() scope is already entered")
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is None:
            raise RuntimeError("monitor_current_task() must be entered inside an asyncio task")
        self._token = _native.SCOPE.set(self)
        try:
            _hub(self._settings.mode).enter(self)
        except BaseException:
            _native.SCOPE.reset(self._token)
            self._token = None
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._token is None:
            return
        try:
            _hub(self._settings.mode).exit(self)
        finally:
            _native.SCOPE.reset(self._token)
            self._token = None


def monitor_current_task(
    threshold_ms: float = DEFAULT_THRESHOLD_MS,
    include_paths: Optional[Iterable[str]] = None,
    exclude_paths: Optional[Iterable[str]] = None,
    on_blocking_call: Optional[BlockingCallCallback] = None,
    context: Optional[Mapping[str, Any]] = None,
    reports_per_minute: Optional[int] = DEFAULT_REPORTS_PER_MINUTE,
    record_to: Optional[PathArg] = None,
    report_stalls: bool = False,
    on_stall: Optional[StallCallback] = None,
    mode: str = "exact",
) -> TaskScope:
    """Monitors only the current task (and tasks it creates inside the block), for one request or
    job in a busy service: other tasks on the same loop are never reported, even while the hook is
    on. Each report carries ``context`` as ``info.context``. Enter it with ``with`` or
    ``async with`` inside a coroutine; see `EventLoopMonitor` for the other arguments.

    Scopes open at the same time on one thread share one hook: the lowest threshold and the first
    scope's include/exclude patterns apply to it, and each scope gets only episodes at or over its
    own threshold.

    ``report_stalls`` is off by default here: a stall reported while it runs is the loop's, and the
    watchdog that reports it cannot tell which task the running step belongs to, so it could name
    a task outside the scope.

    ``mode="sampling"`` watches the scope in the always-on mode (see `EventLoopMonitor`): no
    profile hook, cheap enough for every request. Scopes of each mode are watched apart; a task
    is in one scope at a time (the innermost it entered).
    """
    if context is not None and not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping, got {type(context).__name__}")
    settings = EventLoopMonitor(
        threshold_ms=threshold_ms,
        include_paths=include_paths,
        exclude_paths=exclude_paths,
        on_blocking_call=on_blocking_call,
        reports_per_minute=reports_per_minute,
        record_to=record_to,
        report_stalls=report_stalls,
        on_stall=on_stall,
        mode=mode,
    )
    return TaskScope(settings, context)
