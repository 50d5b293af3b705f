"""loopwatch: find what blocks your asyncio event loop.

A native profile hook times every call on the loop's thread and reports each blocking episode once:
the exact culprit, how long the loop was blocked, and the stack that led there.

    from loopwatch import event_loop_monitor_ctx

    async def main():
        with event_loop_monitor_ctx(threshold_ms=10):
            await serve()
"""

from loopwatch._monitor import DEFAULT_EXCLUDES, EventLoopMonitor, event_loop_monitor_ctx
from loopwatch._recording import Recording, RecordingError, Session, read_recording
from loopwatch._report import BlockingCallCallback, BlockingCallInfo, StackFrame
from loopwatch._scope import TaskScope, monitor_current_task

__all__ = [
    "DEFAULT_EXCLUDES",
    "BlockingCallCallback",
    "BlockingCallInfo",
    "EventLoopMonitor",
    "Recording",
    "RecordingError",
    "Session",
    "StackFrame",
    "TaskScope",
    "event_loop_monitor_ctx",
    "monitor_current_task",
    "read_recording",
]

try:
    from importlib.metadata import version as _version

    __version__ = _version("loopwatch")
except Exception:  # running from a source tree without installed metadata
    __version__ = "0.0.0"
