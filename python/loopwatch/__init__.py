"""loopwatch: find what blocks your asyncio event loop.

A native profile hook times every call on the loop's thread and reports each blocking episode once:
the exact culprit, how long the loop was blocked, and the stack that led there.

    from loopwatch import event_loop_monitor_ctx

    async def main():
        with event_loop_monitor_ctx(threshold_ms=10):
            await serve()

PYTEST_DONT_REWRITE: pytest rewrites the asserts of the packages that ship a pytest plugin, and
warns when one was imported before it could (``LOOPWATCH=1`` imports this package at start-up,
before pytest runs): a warning that ``-W error`` turns into a failed start. loopwatch's own code
has no asserts for pytest to rewrite, so it asks pytest to leave it alone.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing would cost more than the rest
if TYPE_CHECKING:
    from typing import Any

    from loopwatch._monitor import DEFAULT_EXCLUDES, EventLoopMonitor, event_loop_monitor_ctx
    from loopwatch._recording import Recording, RecordingError, Session, read_recording
    from loopwatch._report import BlockingCallCallback, BlockingCallInfo, GilHolder, StackFrame
    from loopwatch._scope import TaskScope, monitor_current_task
    from loopwatch._stalls import StallInfo

# Loaded on first use: importing `loopwatch` (as pytest does with the plugin, and every Python
# start does with LOOPWATCH=1 unset) costs nothing, and a broken native build fails only code
# that uses it.
_HOME = {
    "DEFAULT_EXCLUDES": "loopwatch._monitor",
    "EventLoopMonitor": "loopwatch._monitor",
    "event_loop_monitor_ctx": "loopwatch._monitor",
    "Recording": "loopwatch._recording",
    "RecordingError": "loopwatch._recording",
    "Session": "loopwatch._recording",
    "read_recording": "loopwatch._recording",
    "BlockingCallCallback": "loopwatch._report",
    "BlockingCallInfo": "loopwatch._report",
    "GilHolder": "loopwatch._report",
    "StackFrame": "loopwatch._report",
    "StallInfo": "loopwatch._stalls",
    "TaskScope": "loopwatch._scope",
    "monitor_current_task": "loopwatch._scope",
}

__all__ = [
    "DEFAULT_EXCLUDES",
    "BlockingCallCallback",
    "BlockingCallInfo",
    "EventLoopMonitor",
    "GilHolder",
    "Recording",
    "RecordingError",
    "Session",
    "StackFrame",
    "StallInfo",
    "TaskScope",
    "event_loop_monitor_ctx",
    "monitor_current_task",
    "read_recording",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _installed_version()
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    else:
        raise AttributeError(f"module 'loopwatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})


def _installed_version() -> str:
    try:
        from importlib.metadata import version

        return version("loopwatch")
    except Exception:  # running from a source tree without installed metadata
        return "0.0.0"
