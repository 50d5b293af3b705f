"""What a blocking episode looks like to users: `BlockingCallInfo` and its readable text.
Built from the plain dict the native hook hands over, on the slow path only."""

from __future__ import annotations

import os
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["BlockingCallCallback", "BlockingCallInfo", "GilHolder", "StackFrame"]


@dataclass(frozen=True)
class StackFrame:
    """One frame of an episode's stack (outermost first)."""

    name: str
    """Module-qualified name: ``myapp.service.process_data``, ``time.sleep``."""
    filename: Optional[str]
    """Source file; ``None`` for C functions."""
    lineno: Optional[int]
    """Where this frame was while the loop was blocked: the line that called the next frame, the
    line a coroutine step started at, or a function's first line when it blocked in its own code."""
    duration_ms: float
    """How long this frame ran during the episode."""
    is_c_call: bool = False
    is_coroutine: bool = False
    end_lineno: Optional[int] = None
    """For a coroutine: the line where the step ended (its next ``await`` or its return)."""
    included: bool = True
    """Whether the include/exclude filters let this frame be blamed."""
    user_code: Optional[bool] = None
    """Whether the monitor took this frame for the user's own code (see `is_user_code`); None
    where nobody decided (a frame made by hand, a recording of an older loopwatch)."""

    @property
    def is_user_code(self) -> bool:
        """Code of the user's own project. Without ``include_paths``: a Python file outside the
        standard library and site-packages that the filters do not exclude; with them, a Python
        frame that they include (an installed package of your own, for one)."""
        if self.user_code is not None:
            return self.user_code
        return _is_user_file(self.included, self.filename, include_given=False)

    def describe(self) -> str:
        """One line: where, what, how long."""
        if self.filename is None:
            return f"{self.name} [C]  {self.duration_ms:.1f} ms"
        tags = " (coroutine)" if self.is_coroutine else ""
        return f"{self.filename}:{self.lineno} in {self.name}{tags}  {self.duration_ms:.1f} ms"


@dataclass(frozen=True)
class GilHolder:
    """A thread that held the GIL while the event loop's thread waited for it."""

    thread_id: int
    """Its ``threading`` ident (0 when it could not be read)."""
    thread_name: Optional[str]
    """Its ``threading`` name, if ``threading`` knows the thread."""
    wait_ms: float
    """How long the loop's thread waited while this thread held the GIL."""
    running: Optional[str]
    """What it was running when loopwatch looked: ``function (file.py:line)``, if its stack
    could be read."""

    def describe(self) -> str:
        who = f"thread {self.thread_name!r}" if self.thread_name else f"thread {self.thread_id}"
        doing = f", running {self.running}" if self.running else ""
        return f"{who}: {self.wait_ms:.1f} ms{doing}"


@dataclass(frozen=True)
class BlockingCallInfo:
    """One blocking episode: one continuous stall of the event loop, reported once; a step in
    which several calls side by side each ran over the threshold is reported once per culprit
    (the reports share `episode_id`)."""

    method_name: str
    """The culprit, module-qualified: ``time.sleep``, ``myapp.service.process_data``."""
    duration_ms: float
    """How long the loop was blocked by this episode (the whole callback or task step)."""
    is_c_call: bool = False
    """Whether the culprit is a C function."""
    kind: str = "call"
    """``"call"``: a sync call made by a coroutine step; ``"callback"``: a sync loop callback
    (``call_soon``, a done-callback, a protocol method); ``"step"``: a coroutine step with no single
    call over the threshold (an inline loop, many small calls, a call invisible to the hook);
    ``"gc"``: a callback or step over the threshold only because a garbage collection ran inside
    it: the culprit is the collection (``garbage collection (generation 2)``), and the stack ends
    with the frames it interrupted; ``"gil"``: a callback or step over the threshold only because
    the loop's thread waited for the GIL while other threads held it: the culprit is the wait
    (``waiting for the GIL (held by thread "worker")``), `gil_holders` says who held it and what
    they ran, and the stack ends with the frames it interrupted."""
    filename: Optional[str] = None
    """Where to look: the culprit's file, or for a C function the file of the code that called it."""
    lineno: Optional[int] = None
    """The line in ``filename`` (for a step, the line where the step started)."""
    end_lineno: Optional[int] = None
    """For a step: the line where it ended."""
    stack: tuple[StackFrame, ...] = ()
    """The task's await chain, then the sync chain down to the culprit (the last frame)."""
    task_name: Optional[str] = None
    thread_id: int = 0
    timestamp: float = 0.0
    """When the episode started, in seconds since the epoch (``time.time()``)."""
    threshold_ms: float = 0.0
    culprit_duration_ms: float = field(default=0.0)
    """How long the culprit itself ran (``duration_ms`` covers the whole episode)."""
    cpu_wait_ms: float = 0.0
    """Of ``duration_ms``, how long (at least) the loop's thread was ready to run but had no CPU:
    a busy machine, not the code. A report's ``duration_ms - cpu_wait_ms`` is always at least the
    threshold. 0.0 where the OS does not say (outside Linux)."""
    gc_ms: float = 0.0
    """Of ``duration_ms``, how long the loop's thread spent in garbage collections (each
    collection's wall time). Code is blamed only for what it ran besides them."""
    gil_wait_ms: float = 0.0
    """Of ``duration_ms``, how long (at least) the loop's thread waited for the GIL while other
    threads held it. Code is blamed only for what it ran besides. 0.0 where it is not measured
    (outside Linux, a free-threaded build)."""
    gil_holders: tuple[GilHolder, ...] = ()
    """The threads that held the GIL while the loop's thread waited for it, longest first. Not
    kept in recordings (a ``"gil"`` report's culprit names the first)."""
    context: Optional[Mapping[str, Any]] = None
    """What the monitoring scope the episode happened in says about itself: for a request
    monitored by ``LoopwatchMiddleware``, its ``method``, ``path`` and ``request_id``."""
    suppressed: int = 0
    """How many reports of the same culprit the rate limit held back since the last one
    delivered (see ``reports_per_minute``)."""
    process_id: int = 0
    """The process the episode happened in (``os.getpid()``)."""
    reports_while_running: int = 0
    """How many times loopwatch's watchdog reported this stall to stderr while it still ran (see
    ``report_stalls``); this report, made when it ended, is the one that counts."""
    episode_id: int = 0
    """The reports of one callback or task step share it (with ``process_id``): a step in which
    several sibling calls each ran over the threshold makes one report per culprit, in the order
    they ran, and each says the whole step's ``duration_ms``. 0 in recordings made before."""
    culprits_in_episode: int = 1
    """How many reports (culprits) that step made."""
    share_ms: Optional[float] = None
    """Of ``duration_ms``, the part this report's culprit accounts for: all of it when it is the
    step's only culprit, else its own branch of the step. The shares of one step never overlap:
    add these, not ``duration_ms``, to total the blocked time per culprit."""
    sampled: bool = False
    """Whether the always-on mode (``mode="sampling"``) found it: the duration is exact, the
    stack is the one loopwatch's watchdog read while the step ran, and every frame is given the
    whole duration. Not kept in recordings."""
    _scope: Optional[int] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.share_ms is None:
            object.__setattr__(self, "share_ms", self.duration_ms)

    @property
    def blamed_ms(self) -> float:
        """`share_ms` as a number: the blocked time this report's culprit is charged with."""
        return self.duration_ms if self.share_ms is None else self.share_ms

    @classmethod
    def _from_native(cls, raw: dict[str, Any], found_at: Optional[float] = None) -> BlockingCallInfo:
        """A report from the hook's dict; `found_at` is the ``time.time()`` when the episode ended."""
        stack = _frames(raw["stack"], units_per_ms=1e6, include_given=raw.get("include_given", False))
        culprit = stack[raw["culprit"]]
        located = next((f for f in reversed(stack) if f.filename is not None), None)
        return cls(
            method_name=culprit.name,
            duration_ms=raw["duration_ns"] / 1e6,
            is_c_call=culprit.is_c_call,
            kind=raw["kind"],
            filename=located.filename if located else None,
            lineno=located.lineno if located else None,
            end_lineno=culprit.end_lineno,
            stack=stack,
            task_name=raw["task_name"],
            thread_id=threading.get_ident(),
            process_id=os.getpid(),
            timestamp=(found_at if found_at is not None else time.time()) - raw["duration_ns"] / 1e9,
            threshold_ms=raw["threshold_ns"] / 1e6,
            culprit_duration_ms=culprit.duration_ms,
            cpu_wait_ms=raw["cpu_wait_ns"] / 1e6,
            gc_ms=raw.get("gc_ns", 0) / 1e6,
            gil_wait_ms=raw.get("gil_wait_ns", 0) / 1e6,
            gil_holders=tuple(
                GilHolder(thread_id=ident, thread_name=name, wait_ms=wait_ns / 1e6, running=running)
                for ident, name, wait_ns, running in raw.get("gil_holders", ())
            ),
            reports_while_running=raw.get("reports_while_running", 0),
            episode_id=raw.get("episode_id", 0),
            culprits_in_episode=raw.get("culprits", 1),
            share_ms=raw.get("share_ns", raw["duration_ns"]) / 1e6,
            sampled=raw.get("sampled", False),
            _scope=raw.get("scope"),
        )

    def _to_record(self) -> dict[str, Any]:
        """The fields a recording keeps (`loopwatch._recording`); frames as tuples in field order."""
        return {
            "timestamp": self.timestamp,
            "process_id": self.process_id,
            "thread_id": self.thread_id,
            "kind": self.kind,
            "method_name": self.method_name,
            "duration_ms": self.duration_ms,
            "culprit_duration_ms": self.culprit_duration_ms,
            "threshold_ms": self.threshold_ms,
            "cpu_wait_ms": self.cpu_wait_ms,
            "gc_ms": self.gc_ms,
            "gil_wait_ms": self.gil_wait_ms,
            "is_c_call": self.is_c_call,
            "filename": self.filename,
            "lineno": self.lineno,
            "end_lineno": self.end_lineno,
            "task_name": self.task_name,
            "context": {str(k): str(v) for k, v in self.context.items()} if self.context else None,
            "reports_while_running": self.reports_while_running,
            "episode_id": self.episode_id,
            "culprits_in_episode": self.culprits_in_episode,
            "share_ms": self.share_ms if self.culprits_in_episode > 1 else None,
            "stack": [
                (
                    f.name,
                    f.filename,
                    f.lineno,
                    f.end_lineno,
                    f.duration_ms,
                    f.is_c_call,
                    f.is_coroutine,
                    f.included,
                    f.is_user_code,
                )
                for f in self.stack
            ],
        }

    @classmethod
    def _from_record(cls, record: dict[str, Any]) -> BlockingCallInfo:
        fields = dict(record)
        fields["stack"] = _frames(record["stack"], units_per_ms=1, include_given=None)
        return cls(**fields)

    @property
    def location(self) -> str:
        if self.filename is None:
            return "<unknown>"
        return f"{self.filename}:{self.lineno}" if self.lineno else self.filename

    def _user_index(self) -> Optional[int]:
        return next((i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i].is_user_code), None)

    @property
    def user_frame(self) -> Optional[StackFrame]:
        """The innermost frame of the user's own code (`StackFrame.is_user_code`): where to fix
        it. None when the whole stack is libraries and C."""
        user = self._user_index()
        return None if user is None else self.stack[user]

    @property
    def via(self) -> Optional[str]:
        """For a culprit outside the user's code, the library function that the user's code
        called on the way to it: ``requests.get`` for a ``socket.socket.recv_into``. None when
        the user's code called the culprit itself, or is the culprit."""
        user = self._user_index()
        if user is None or user >= len(self.stack) - 2:
            return None
        return self.stack[user + 1].name

    @property
    def where(self) -> str:
        """The line of the user's own code that led to the culprit, and its function:
        ``shop/services.py:10 in shop.services.get_inventory``; the culprit's `location` when no
        frame is the user's."""
        frame = self.user_frame
        if frame is None or frame.filename is None:
            return self.location
        line = f"{frame.filename}:{frame.lineno}" if frame.lineno else frame.filename
        return line if frame is self.stack[-1] else f"{line} in {frame.name}"

    def headline(self) -> str:
        task = f" in task {self.task_name!r}" if self.task_name else ""
        scope = ""
        if self.context:
            scope = " (" + ", ".join(f"{key}={value}" for key, value in self.context.items()) + ")"
        held_back = f"; {self.suppressed} more like it held back" if self.suppressed else ""
        # A collection or a wait for the GIL is the last frame, below the one it interrupted.
        interrupted = self.stack[-2].name if len(self.stack) >= 2 else None
        during = f" while {interrupted} ran" if interrupted else ""
        if self.kind == "gc":
            return (
                f"{self.method_name}, {self.gc_ms:.1f} ms, blocked the event loop for "
                f"{self.duration_ms:.1f} ms{task}{scope}{during}, at {self.where}; no code is to "
                f"blame{held_back}"
            )
        if self.kind == "gil":
            return (
                f"{self.method_name}: the event loop was blocked for {self.duration_ms:.1f} ms"
                f"{task}{scope}{during}, {self.gil_wait_ms:.1f} ms of it waiting for the GIL, at "
                f"{self.where}; no code of the loop's is to blame{held_back}"
            )
        what = {
            "call": "blocked the event loop",
            "callback": "(a loop callback) blocked the event loop",
            "step": "(a coroutine step with no single slow call) blocked the event loop",
        }.get(self.kind, "blocked the event loop")
        via = f" (via {self.via})" if self.via else ""
        how_long = f"{self.duration_ms:.1f} ms"
        if self.culprits_in_episode > 1:
            how_long = (
                f"{self.blamed_ms:.1f} ms (one of {self.culprits_in_episode} culprits of one "
                f"{self.duration_ms:.1f} ms step)"
            )
        return f"{self.method_name}{via} {what} for {how_long}{task}{scope} at {self.where}{held_back}"

    def format(self, max_frames: Optional[int] = None) -> str:
        """A readable report: headline, location, then the stack with the user's frames first."""
        lines = [self.headline()]
        where = f"  at {self.location}"
        if self.kind == "step" and self.end_lineno:
            where += f" (the step ran from line {self.lineno} to line {self.end_lineno})"
        lines.append(where)
        if self.sampled:
            lines.append("  (always-on mode: the stack as read while it ran)")
        elif self.kind in ("gc", "gil"):
            pass  # the headline says how long the collection or the wait took
        elif self.culprit_duration_ms < 0.9 * self.blamed_ms:
            lines.append(f"  {self.method_name} itself ran {self.culprit_duration_ms:.1f} ms of it")
        if self.cpu_wait_ms >= 0.1 * self.duration_ms:
            lines.append(
                f"  {self.cpu_wait_ms:.1f} ms of it the loop's thread waited for a CPU (a busy machine)"
            )
        if self.kind != "gc" and self.gc_ms >= 0.1 * self.duration_ms:
            lines.append(f"  {self.gc_ms:.1f} ms of it was garbage collection (not counted against the code)")
        if self.kind != "gil" and self.gil_wait_ms >= 0.1 * self.duration_ms:
            lines.append(
                f"  {self.gil_wait_ms:.1f} ms of it the loop's thread waited for the GIL held by other "
                "threads (not counted against the code)"
            )
        if self.gil_holders and (self.kind == "gil" or self.gil_wait_ms >= 0.1 * self.duration_ms):
            lines.append("  the GIL was held by:")
            lines.extend(f"    {holder.describe()}" for holder in self.gil_holders)
        innermost_first = list(reversed(self.stack))
        groups = [
            ("your code", [f for f in innermost_first if f.is_user_code]),
            ("libraries and C", [f for f in innermost_first if not f.is_user_code]),
        ]
        budget = len(self.stack) if max_frames is None else max_frames
        for title, frames in groups:
            if not frames:
                continue
            lines.append(f"  {title} (innermost first):")
            for frame in frames[:budget]:
                marker = "  <- culprit" if frame is self.stack[-1] else ""
                lines.append(f"    {frame.describe()}{marker}")
            if len(frames) > budget:
                lines.append(f"    ... {len(frames) - budget} more")
            budget = max(budget - len(frames), 1)
        if self.reports_while_running:
            times = "once" if self.reports_while_running == 1 else f"{self.reports_while_running} times"
            lines.append(f"  reported {times} while it ran (on stderr); this is its full duration")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _frames(
    rows: Iterable[Sequence[Any]], units_per_ms: float, include_given: Optional[bool]
) -> tuple[StackFrame, ...]:
    """Stack frames from the tuples of the native module and of recordings: `(name, filename,
    lineno, end_lineno, duration, is_c_call, is_coroutine, included[, user_code])`, durations in
    ns or ms. The user's code is decided here, once (`include_given`: whether the monitor had
    ``include_paths``), or taken from the row (None: a recording, which says it where it can)."""
    frames = []
    for row in rows:
        name, filename, lineno, end_lineno, duration, is_c_call, is_coroutine, included = row[:8]
        if include_given is None:
            user_code = row[8] if len(row) > 8 else None
        else:
            user_code = _is_user_file(included, filename, include_given)
        frames.append(
            StackFrame(
                name=name,
                filename=filename,
                lineno=lineno,
                end_lineno=end_lineno,
                duration_ms=duration / units_per_ms,
                is_c_call=is_c_call,
                is_coroutine=is_coroutine,
                included=included,
                user_code=user_code,
            )
        )
    return tuple(frames)


BlockingCallCallback = Callable[[BlockingCallInfo], None]
"""What ``on_blocking_call`` receives: one call per blocking episode (per culprit: `episode_id`)."""


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


_LIBRARY_ROOTS = _library_roots()


def _is_user_file(included: bool, filename: Optional[str], include_given: bool) -> bool:
    """The rule of `StackFrame.is_user_code`."""
    if not included or filename is None:
        return False
    return include_given or not _is_library_file(filename)


def _is_library_file(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.realpath(filename)
    return path.startswith(_LIBRARY_ROOTS) or f"{os.sep}site-packages{os.sep}" in path
