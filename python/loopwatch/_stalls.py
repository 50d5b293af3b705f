"""Stalls reported while they ran: what loopwatch's watchdog thread writes, without Python, when a
step has run past the threshold and is still running (to stderr, and to the recordings of the
monitors that record). The report made when the step ends, if it ends, counts them in
``BlockingCallInfo.reports_while_running``; a recording shows the stalls that never ended."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from loopwatch import _native

__all__ = ["StallCallback", "StallInfo"]


@dataclass(frozen=True)
class StallInfo:
    """One report of a stall made while it still ran."""

    timestamp: float
    """When the stall started, in seconds since the epoch."""
    process_id: int
    thread_id: int
    """The loop's thread, as ``threading.get_ident()`` names it."""
    thread_name: str
    so_far_ms: float
    """How long it had run when this report was made."""
    threshold_ms: float
    number: int
    """1 for the stall's first report (at the threshold), 2 for the next (10x), and so on."""
    stack: tuple[tuple[str, str, Optional[int]], ...]
    """The loop thread's Python stack when the report was made, innermost first:
    ``(filename, function, lineno)``; empty if it could not be read."""
    in_gc: bool = False
    """The thread was running a garbage collection when the stack was read: the innermost frame
    is the one the collection interrupted, not code that ran long."""

    @property
    def where(self) -> str:
        """The innermost frame: ``app.py:12 in handler``, or ``<unknown>``."""
        if not self.stack:
            return "<unknown>"
        filename, function, lineno = self.stack[0]
        return f"{filename}:{lineno} in {function}" if lineno else f"{filename} in {function}"

    def format(self, max_frames: int = 8) -> str:
        lines = [
            f"the event loop of thread {self.thread_name!r} had been blocked for {self.so_far_ms:.0f} ms "
            f"and was still running{', in a garbage collection' if self.in_gc else ''}, at {self.where}"
        ]
        for filename, function, lineno in self.stack[:max_frames]:
            lines.append(
                f"    {filename}:{lineno} in {function}" if lineno else f"    {filename} in {function}"
            )
        if len(self.stack) > max_frames:
            lines.append(f"    ... {len(self.stack) - max_frames} more frames")
        return "\n".join(lines)

    @classmethod
    def _from_record(cls, record: dict[str, Any]) -> StallInfo:
        fields = dict(record)
        fields["stack"] = tuple(tuple(frame) for frame in record["stack"])
        return cls(**fields)


StallCallback = Callable[[StallInfo], Any]

logger = logging.getLogger("loopwatch")

_hubs: dict[int, weakref.WeakSet[Any]] = {}
"""Each watched thread's hubs (`loopwatch._monitor._ThreadHub`, one per mode), by thread ident."""


def register_hub(ident: int, hub: Any) -> None:
    _hubs.setdefault(ident, weakref.WeakSet()).add(hub)


_IDLE_WAIT_S = 3600.0


class _Courier:
    """A thread of loopwatch's own that hands reports of running stalls to ``on_stall`` callbacks:
    it waits for them with the GIL released and calls the callbacks as soon as it has the GIL
    (while a C call on the loop's thread holds it, they wait). It ends before each fork, so that
    CPython never warns of a multi-threaded fork because of it, and at exit; it starts again when
    a monitor with ``on_stall`` is next activated or reports."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._pid = 0
        self._stopping = False
        self._lock = threading.Lock()

    def ensure(self) -> None:
        thread = self._thread
        if thread is not None and self._pid == os.getpid() and thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._stopping = False
            _native._release_stalls(False)
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="loopwatch-stalls", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            return
        self._stopping = True
        _native._release_stalls(True)
        thread.join(timeout=1.0)
        self._thread = None
        if not thread.is_alive():
            # A join returns a little before the kernel stops counting the thread, and CPython
            # counts threads that way when it warns of a multi-threaded fork (as for the watchdog).
            _native._wait_thread_gone(thread.native_id, 0.2)

    def _run(self) -> None:
        while not self._stopping:
            try:
                # Until a report comes or `stop()` releases it: an idle courier never wakes, so
                # it never takes the GIL from the program's threads for nothing.
                taken = _native._take_stalls(_IDLE_WAIT_S)
            except Exception:  # pragma: no cover - a loopwatch bug; never the program's problem
                logger.exception("loopwatch: reports of running stalls can no longer be handed on")
                return
            for raw in taken:
                if raw["process_id"] != os.getpid():
                    continue  # made before a fork, for the parent
                for hub in list(_hubs.get(raw["thread_id"], ())):
                    hub.deliver_stall(StallInfo._from_record(raw))
            dropped = _native._dropped_stalls()
            if dropped:
                logger.warning("loopwatch dropped %d reports of running stalls waiting for on_stall", dropped)


courier = _Courier()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=courier.stop)
atexit.register(courier.stop)
