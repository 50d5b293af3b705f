"""Recorded sessions: each report written to a file as it is made (``record_to=``, ``--record``)
and read back for ``loopwatch report``. The format, and what counts as damage, are the Rust core's.

A recording is a MessagePack stream: the string ``"loopwatch-recording"``, the format version,
then one ``bin`` per record, holding a map with a ``"type"``: ``"session"`` (a process that
recorded: ``process_id``, ``argv``, ``started_at``, ``python_version``, ``loopwatch_version``),
``"episode"`` (the fields of `BlockingCallInfo`) or ``"stall"`` (a stall reported while it still
ran, written by the watchdog thread itself: the fields of `StallInfo`). Each record reaches the OS
in one write, so a program that crashes or is killed leaves whole records; several threads and
processes (forked workers, children started with ``LOOPWATCH_RECORD``) can add to one file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from loopwatch import _native
from loopwatch._report import BlockingCallInfo
from loopwatch._stalls import StallInfo

__all__ = ["Recorder", "Recording", "RecordingError", "Session", "open_recorder", "read_recording"]

logger = logging.getLogger("loopwatch")

PathArg = Union[str, "os.PathLike[str]"]


class RecordingError(Exception):
    """A recording that cannot be written or read; the message is one line for a person."""


@dataclass(frozen=True)
class Session:
    """A process that recorded into the file."""

    process_id: int
    argv: tuple[str, ...]
    started_at: float
    """Seconds since the epoch."""
    python_version: str
    loopwatch_version: str


@dataclass(frozen=True)
class Recording:
    path: str
    sessions: tuple[Session, ...]
    episodes: tuple[BlockingCallInfo, ...]
    """In the order they were written."""
    problem: Optional[str]
    """One line when the file is cut short or damaged after its start (what could be read is in
    ``episodes``); ``None`` when it is whole."""
    stalls: tuple[StallInfo, ...] = ()
    """Every report of a stall made while it still ran, in the order written."""
    unfinished_stalls: tuple[StallInfo, ...] = ()
    """The last report of each stall that no report of its end follows in the file: the step
    was still running when the recording stopped (a hang, a process killed while blocked), or it
    ended with nothing to blame."""


class Recorder:
    """Adds reports to one recording file. Made by `open_recorder`; shared by every monitor of the
    process that records to the same file."""

    def __init__(self, path: str, writer: _native.RecordingWriter, file: str = "") -> None:
        self.path = path
        self.file = file or path
        """The absolute path, for loopwatch's watchdog, which adds its reports of stalls."""
        self._writer = writer
        self._lock = threading.Lock()
        self._session_of: Optional[int] = None
        self._failures = 0

    def write(self, info: BlockingCallInfo) -> None:
        """Appends one report. Never raises: a failure (a full disk) is logged once, then counted."""
        self._append(info)

    def start_session(self) -> None:
        """Writes this process's session record if it has not yet. Never raises."""
        self._append(None)

    def _append(self, info: Optional[BlockingCallInfo]) -> None:
        try:
            with self._lock:
                if self._session_of != os.getpid():  # first write, or first in a forked child
                    self._write_session()
                if info is not None:
                    self._writer.write_episode(info._to_record())
        except Exception as error:
            self._failures += 1
            if self._failures == 1:
                logger.error("loopwatch could not add to the recording %s: %s", self.path, error)

    def restart(self) -> None:
        """Empties the recording and starts it afresh (`RecordingError` if that fails)."""
        try:
            with self._lock:
                self._writer.restart()
                self._session_of = None
        except OSError as error:
            raise _cannot_record(self.path, error) from None

    def _write_session(self) -> None:
        # The extension's version is the package's (maturin takes it from Cargo.toml), and asking
        # it costs nothing: reading the installed metadata held the loop for ~50 ms the first time.
        self._writer.write_session(
            os.getpid(), list(sys.argv), time.time(), platform.python_version(), _native.__version__
        )
        self._session_of = os.getpid()


def _cannot_record(shown: str, error: Exception) -> RecordingError:
    """Worded as Python words an OSError (its strerror, not its errno), or as the refusal says."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else error
    return RecordingError(f"cannot record to {shown}: {reason}")


_recorders: dict[str, Recorder] = {}
_recorders_lock = threading.Lock()


def open_recorder(path: PathArg, *, truncate: bool = False) -> Recorder:
    """The process's recorder for `path`: the file is created, or added to if it is already a
    recording (``truncate`` starts it afresh). `RecordingError` if it cannot be written or holds
    something else; such a file is never changed."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"record_to must be a file path, got {type(path).__name__}")
    shown = os.fspath(path)
    key = os.path.realpath(os.path.expanduser(shown))
    with _recorders_lock:
        recorder = _recorders.get(key)
        if recorder is None:
            try:
                writer = _native.RecordingWriter(key)
            except (OSError, ValueError) as error:
                raise _cannot_record(shown, error) from None
            recorder = _recorders[key] = Recorder(shown, writer, key)
    if truncate:
        recorder.restart()
    return recorder


def read_recording(
    path: PathArg,
    progress: Optional[Callable[[int, int], None]] = None,
    *,
    stacks: Literal["all", "worst"] = "all",
) -> Recording:
    """Reads a whole recording. `progress(bytes_read, total_bytes)` is called now and then.
    `RecordingError` if the file is missing, unreadable or no recording; damage after its start
    is not an error: what could be read is returned, with `Recording.problem` saying what was lost.

    ``stacks="worst"`` keeps the stack of each culprit's longest episode only (the first of
    equals), the others get ``stack=()``: what a summary needs, in a fraction of the memory.
    """
    if stacks not in ("all", "worst"):
        raise ValueError(f'stacks must be "all" or "worst", got {stacks!r}')
    shown = os.fspath(path)
    try:
        reader = _native.RecordingReader(os.path.expanduser(shown))
    except OSError as error:
        raise RecordingError(f"{shown}: {error.strerror or error}") from None
    except ValueError as error:
        raise RecordingError(f"{shown}: {error}") from None
    sessions: list[Session] = []
    episodes: list[BlockingCallInfo] = []
    stalls: list[StallInfo] = []
    # Each thread's stall reported last, until a report of a stall's end follows it.
    running: dict[tuple[int, int], StallInfo] = {}
    damage: list[str] = []
    # For stacks="worst": each culprit's longest episode so far, by its index in `episodes`.
    longest: dict[str, tuple[int, float]] = {}
    for count, (kind, value) in enumerate(reader):
        if kind == "episode":
            if stacks == "worst":
                name, duration = value["method_name"], value["duration_ms"]
                held = longest.get(name)
                if held is None or duration > held[1]:
                    if held is not None:
                        episodes[held[0]] = dataclasses.replace(episodes[held[0]], stack=())
                    longest[name] = (len(episodes), duration)
                else:
                    value["stack"] = ()
            episodes.append(BlockingCallInfo._from_record(value))
            if value.get("reports_while_running"):
                running.pop((value["process_id"], value["thread_id"]), None)
        elif kind == "stall":
            stall = StallInfo._from_record(value)
            stalls.append(stall)
            running[(stall.process_id, stall.thread_id)] = stall
        elif kind == "session":
            sessions.append(_session(value))
        else:
            damage.append(value)
        if progress is not None and count % 4096 == 0:
            progress(reader.offset, reader.size)
    if progress is not None:
        progress(reader.offset, reader.size)
    problem = None
    if damage:
        more = f" (and {len(damage) - 1} more damaged records)" if len(damage) > 1 else ""
        problem = f"{shown}: {damage[0]}{more}; read {len(episodes)} episodes"
    return Recording(shown, tuple(sessions), tuple(episodes), problem, tuple(stalls), tuple(running.values()))


def _session(raw: dict[str, Any]) -> Session:
    return Session(
        process_id=raw["process_id"],
        argv=tuple(raw["argv"]),
        started_at=raw["started_at"],
        python_version=raw["python_version"],
        loopwatch_version=raw["loopwatch_version"],
    )
