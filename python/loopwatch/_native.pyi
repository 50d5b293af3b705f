"""The compiled core of loopwatch (private: use the `loopwatch` package)."""

import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Optional, final

__all__ = [
    "DEFAULT_EXCLUDES",
    "SCOPE",
    "Filters",
    "RecordingReader",
    "RecordingWriter",
    "ThreadMonitor",
    "ThreadSampler",
    "__version__",
    "_bench_install_empty_hook",
    "_bench_uninstall_hook",
    "_code_reads",
    "_dropped_stalls",
    "_gc_callback",
    "_gil_waits_measured",
    "_local_variable",
    "_read_stack",
    "_release_stalls",
    "_stack_reads",
    "_take_stalls",
    "_wait_thread_gone",
    "_watched",
]

DEFAULT_EXCLUDES: list[str]
__version__: str
SCOPE: ContextVar[Any]

@final
class Filters:
    """Compiled include/exclude patterns."""

    def __new__(cls, include: list[str] = ..., exclude: list[str] = ...) -> Filters: ...
    def allows(self, name: str, module: str, filename: Optional[str] = None) -> bool: ...

@final
class ThreadMonitor:
    """One thread's profile hook."""

    def __new__(cls) -> ThreadMonitor: ...
    def install(
        self,
        threshold_ms: float,
        filters: Filters,
        sink: Callable[[dict[str, Any]], None],
        stall_reports: bool = True,
        stall_recordings: list[str] = ...,
        stall_callbacks: bool = False,
    ) -> None: ...
    def reconfigure(
        self,
        threshold_ms: float,
        filters: Filters,
        sink: Callable[[dict[str, Any]], None],
        stall_reports: bool = True,
        stall_recordings: list[str] = ...,
        stall_callbacks: bool = False,
    ) -> None: ...
    def uninstall(self) -> bool: ...
    def flush(self) -> None: ...
    def after_fork(self) -> None: ...
    def set_paused(self, paused: bool) -> bool: ...
    @property
    def installed(self) -> bool: ...
    @property
    def hooked(self) -> bool: ...
    @property
    def paused_profiler(self) -> Any | None: ...
    @property
    def backend(self) -> str: ...
    @property
    def fallback(self) -> Optional[str]: ...
    def __call__(self, _frame: Any, _event: Any, _arg: Any) -> None: ...

if sys.version_info >= (3, 11):
    @final
    class ThreadSampler:
        """One thread's always-on watch (each call of asyncio's `Handle._run` timed)."""

        def __new__(cls) -> ThreadSampler: ...
        def install(
            self,
            threshold_ms: float,
            filters: Filters,
            sink: Callable[[dict[str, Any]], None],
            stall_reports: bool = True,
            stall_recordings: list[str] = ...,
            stall_callbacks: bool = False,
        ) -> None: ...
        def reconfigure(
            self,
            threshold_ms: float,
            filters: Filters,
            sink: Callable[[dict[str, Any]], None],
            stall_reports: bool = True,
            stall_recordings: list[str] = ...,
            stall_callbacks: bool = False,
        ) -> None: ...
        def uninstall(self) -> bool: ...
        def flush(self) -> None: ...
        def after_fork(self) -> None: ...
        def set_paused(self, paused: bool) -> bool: ...
        @staticmethod
        def sees_c_loops() -> bool:
            """Whether loops implemented in C (uvloop) are watched too (3.14+)."""
        @property
        def installed(self) -> bool: ...
        @property
        def hooked(self) -> bool: ...
        @property
        def paused_profiler(self) -> None: ...
        @property
        def backend(self) -> str: ...
        @property
        def fallback(self) -> None: ...

def _bench_install_empty_hook() -> None:
    """Installs a profile hook that does nothing (the benchmarks' floor)."""

def _bench_uninstall_hook() -> None:
    """Removes any profile function from the calling thread."""

def _gc_callback(phase: Any, info: Any) -> None:
    """For `gc.callbacks`: times each garbage collection on the thread that runs it."""

def _gil_waits_measured() -> bool:
    """Whether waits for the GIL are measured in this process (learning where the GIL is, the
    first time: a thread of loopwatch's own waits for it a few milliseconds)."""

def _local_variable(frame: Any, name: str) -> Any:
    """A local variable of a frame (None if it has none such, or is no frame), read without
    leaving a copy of the frame's locals behind."""

def _wait_thread_gone(native_id: Optional[int], timeout_s: float) -> None:
    """Waits (at most `timeout_s`, up to 1 s) until a joined thread is no longer one of the
    process's threads in the kernel's count (Linux)."""

def _code_reads() -> str:
    """How the hook reads a frame's code: "struct" or "portable"."""

def _watched() -> Optional[str]:
    """How the calling thread is watched now: "monitoring", "legacy" or None."""

def _read_stack(tstate: Optional[int] = None, details: bool = False) -> Optional[list[tuple[Any, ...]]]:
    """A thread's Python stack read as the watchdog reads it, innermost first: the calling
    thread's, or with `tstate` (from `_stack_reads`) another's, read with the GIL released.
    Each frame is `(filename, function, line)`, with `details` also the span
    `(end_line, col, end_col)` of its instruction, whether it is a coroutine's, and whether it
    waited in a call (the innermost only). None when stacks cannot be read here."""

def _take_stalls(timeout_s: float) -> list[dict[str, Any]]:
    """Waits up to `timeout_s` (GIL released) for reports of running stalls and takes them."""

def _release_stalls(release: bool = True) -> None:
    """Ends every wait of `_take_stalls` now (and later ones at once), or lets them wait again."""

def _dropped_stalls() -> int:
    """How many reports of running stalls were dropped, waiting, since the last call."""

def _stack_reads() -> tuple[int, Optional[str]]:
    """The calling thread's PyThreadState address, and why stacks cannot be read (or None)."""

@final
class RecordingWriter:
    """Adds records to a recording file, each in one write."""

    def __new__(cls, path: str) -> RecordingWriter: ...
    def restart(self) -> None: ...
    def write_session(
        self, process_id: int, argv: list[str], started_at: float, python_version: str, loopwatch_version: str
    ) -> None: ...
    def write_episode(self, episode: dict[str, Any]) -> None: ...

@final
class RecordingReader:
    """Reads a recording record by record: ("session", dict), ("episode", dict) or ("damage", str)."""

    def __new__(cls, path: str) -> RecordingReader: ...
    @property
    def offset(self) -> int: ...
    @property
    def size(self) -> int: ...
    def __iter__(self) -> RecordingReader: ...
    def __next__(self) -> tuple[str, Any]: ...
