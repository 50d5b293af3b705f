"""``loopwatch report FILE``: what a recording says, culprit by culprit, as text, JSON or one HTML page.
The grouping and statistics are plain functions over episodes; the command only reads and prints.

Each culprit (``BlockingCallInfo.method_name``) gets: its number of episodes, their total, p50, p99
and max duration, its share of all blocked time, and its worst episode as the example. Percentiles
are nearest-rank: the smallest duration with at least p% of the culprit's episodes at or under it,
so they are always durations that happened (with fewer than 100 episodes, p99 is the max).
Culprits are ordered by total blocked time, most first.

``--json`` prints one document (times are seconds since the epoch, durations milliseconds)::

    {
      "format": "loopwatch-report",     # always; "version" changes only when a key changes meaning
      "version": 1,
      "file": "app.lwrec",
      "problem": null,                  # or one line: the file is cut short or damaged
      "sessions": [{"process_id", "argv", "started_at", "python_version", "loopwatch_version"}],
      "processes": 1,                   # distinct process ids among sessions and episodes
      "episodes": 28,                   # reports: a step with several culprits makes one each
      "steps": 27,                      # the callbacks and steps they came from
      "blocked_ms": 512.3,              # how long those steps blocked the loop, each counted once
      "first_at": 1700000000.1,         # start of the first episode (null without episodes)
      "last_at": 1700000012.4,          # end of the last episode
      "percentiles": "nearest-rank",
      "unfinished_stalls": [{           # stalls reported while running that no report of their
        "process_id", "thread_id",      # end follows: still running when the recording stopped
        "thread_name", "started_at", "so_far_ms",
        "reports",                      # how many times it was reported while running
        "stack": [["filename", "function", "lineno"]]   # innermost first, read while it ran
      }],
      "culprits_total": 5,              # before --top
      "culprits": [{                    # the --top N worst, by total blocked time
        "rank": 1, "culprit": "time.sleep", "is_c_call": true,
        "kinds": {"call": 14},          # episodes by kind: call, callback, step, gc, gil
        "count": 14, "total_ms": 420.1, "share": 0.82,   # share of blocked_ms, 0..1
                                        # (durations are each report's share_ms: the part of
                                        # its step that is this culprit's)
        "p50_ms": 25.1, "p99_ms": 40.2, "max_ms": 40.2,
        "cpu_wait_ms": 0.0,             # of total_ms, time the loop's thread waited for a CPU
        "gc_ms": 0.0,                   # of total_ms, time it spent in garbage collections
        "example": {                    # the culprit's longest episode
          "timestamp", "duration_ms", "culprit_duration_ms", "kind", "process_id", "thread_id",
          "task_name", "context", "filename", "lineno",
          "where",                      # the user's line that led there: "app/db.py:10 in app.db.load"
          "via",                        # the library function the user's code called, or null
          "stack": [{"name", "filename", "lineno", "end_lineno", "duration_ms", "is_c_call",
                     "is_coroutine", "is_user_code"}]   # outermost first; the culprit is last
        }
      }]
    }

Exit status: 0; 1 when the file cannot be read, the output cannot be written, or the file is cut
short (what was read is still reported, then the problem is printed on stderr, as ``zcat`` does);
2 for bad usage; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from loopwatch._recording import Recording, RecordingError, Session, read_recording
from loopwatch._report import BlockingCallInfo

__all__ = ["CulpritStats", "Summary", "render_json", "render_text", "summarize"]

DESCRIPTION = """\
Summarize a recording: the culprits that blocked the event loop, worst first, with how
often (count), how long in total and per episode (p50, p99, max: nearest-rank percentiles,
in ms), and the stack of each culprit's worst episode.

Record with EventLoopMonitor(record_to="app.lwrec") or `loopwatch run --record app.lwrec`,
then:
  loopwatch report app.lwrec                 a table and example stacks
  loopwatch report app.lwrec --json          one JSON document (keys: see the docs)
  loopwatch report app.lwrec --html out.html a page with a timeline and charts

exit status: 0 ok, 1 unreadable or cut-short file, 2 bad usage"""

DEFAULT_TOP = 10
STACK_FRAMES = 8
"""Frames shown per example stack in the text report (the user's own first)."""
PROGRESS_FROM_BYTES = 2_000_000
"""Below this a file reads in well under a second: no progress line."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class CulpritStats:
    """One culprit's episodes, summed up."""

    culprit: str
    count: int
    total_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    share: float
    """Of all the recording's blocked time, 0..1."""
    cpu_wait_ms: float
    gc_ms: float
    kinds: Mapping[str, int]
    worst: BlockingCallInfo
    """The longest episode (the first of equals): the example shown."""


@dataclass(frozen=True)
class Summary:
    """A recording, summed up: file-level facts and every culprit, worst first."""

    recording: Recording
    process_ids: tuple[int, ...]
    blocked_ms: float
    steps: int
    first_at: Optional[float]
    last_at: Optional[float]
    culprits: tuple[CulpritStats, ...]


def percentile(ordered: Sequence[float], p: int) -> float:
    """Nearest-rank percentile of values sorted ascending (not empty); `p` in 1..100."""
    rank = max(1, (p * len(ordered) + 99) // 100)  # ceil(p/100 * n) in integers: no float edge
    return ordered[rank - 1]


def _in_share(part_ms: float, info: BlockingCallInfo) -> float:
    """Of a step's `part_ms` (its CPU wait or collections), what surely fell in this report's
    share of it: all of it for a lone culprit; else what is left after the rest of the step."""
    return max(0.0, part_ms - (info.duration_ms - info.blamed_ms))


def summarize(recording: Recording) -> Summary:
    episodes = recording.episodes
    by_culprit: dict[str, list[BlockingCallInfo]] = {}
    for info in episodes:
        by_culprit.setdefault(info.method_name, []).append(info)
    # A step with several culprits made a report for each; its time is counted once.
    steps: dict[tuple[int, int], float] = {}
    for i, info in enumerate(episodes):
        key = (info.process_id, info.episode_id) if info.episode_id else (-1, i)
        steps[key] = info.duration_ms
    blocked_ms = math.fsum(steps.values())
    culprits = []
    for name, infos in by_culprit.items():
        durations = sorted(info.blamed_ms for info in infos)
        total = math.fsum(durations)
        kinds: dict[str, int] = {}
        for info in infos:
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
        culprits.append(
            CulpritStats(
                culprit=name,
                count=len(infos),
                total_ms=total,
                p50_ms=percentile(durations, 50),
                p99_ms=percentile(durations, 99),
                max_ms=durations[-1],
                share=total / blocked_ms if blocked_ms > 0 else 0.0,
                cpu_wait_ms=math.fsum(_in_share(info.cpu_wait_ms, info) for info in infos),
                gc_ms=math.fsum(_in_share(info.gc_ms, info) for info in infos),
                kinds=dict(sorted(kinds.items())),
                worst=max(infos, key=lambda info: info.blamed_ms),
            )
        )
    culprits.sort(key=lambda c: (-c.total_ms, -c.count, c.culprit))
    timed = [info for info in episodes if math.isfinite(info.timestamp) and math.isfinite(info.duration_ms)]
    process_ids = {s.process_id for s in recording.sessions} | {info.process_id for info in episodes}
    return Summary(
        recording=recording,
        process_ids=tuple(sorted(process_ids)),
        blocked_ms=blocked_ms,
        steps=len(steps),
        first_at=min((info.timestamp for info in timed), default=None),
        last_at=max((info.timestamp + info.duration_ms / 1000 for info in timed), default=None),
        culprits=tuple(culprits),
    )


# ---- text ----------------------------------------------------------------------------------------

NAME_WIDTH = 36
_TABLE_HEADER = (
    f"{'#':>3}  {'culprit':<{NAME_WIDTH}} {'count':>6} {'total ms':>9} {'share':>6} "
    f"{'p50':>7} {'p99':>7} {'max':>7}"
)


def where_in_user_code(info: BlockingCallInfo) -> str:
    """The line under a culprit's row: where the user's code led to it in its worst episode, and
    the library call made there (``at shop/services.py:10 in shop.services.get_inventory, via
    requests.get``). Never cut short: a path is only useful whole."""
    via = f", via {info.via}" if info.via else ""
    return one_line(f"at {info.where}{via}")


def one_line(text: str) -> str:
    """`text` safe to print on one line: a crafted file could name a culprit with control codes."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters, keeping its end: the function, not the package."""
    name = one_line(name)
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def plural(count: int, word: str, words: Optional[str] = None) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {words or word + 's'}"


def format_span(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def format_blocked(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s" if ms < 60_000 else format_span(ms / 1000)


def local_time(at: float, with_date: bool = False, millis: bool = False, digits: int = 3) -> str:
    """`at` (seconds since the epoch) in local time; `millis` adds `digits` decimals of seconds."""
    whole = math.floor(at)
    thousandths = round((at - whole) * 1000)  # rounded: 0.01 is 0.00999... in binary
    if thousandths == 1000:
        whole, thousandths = whole + 1, 0
    stamp = time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", time.localtime(whole))
    if not millis or digits <= 0:
        return stamp
    return f"{stamp}.{thousandths:03d}"[: len(stamp) + 1 + digits]


def time_range(summary: Summary) -> str:
    """``2024-05-01 10:00:00 to 10:02:13 (2 min 13 s)`` in local time; '' without episodes."""
    if summary.first_at is None or summary.last_at is None:
        return ""
    start, end = summary.first_at, summary.last_at
    same_day = time.localtime(start)[:3] == time.localtime(end)[:3]
    return (
        f"{local_time(start, with_date=True)} to {local_time(end, with_date=not same_day)}"
        f" ({format_span(end - start)})"
    )


def describe_session(session: Session) -> str:
    command = " ".join(session.argv) or "?"
    return one_line(f"pid {session.process_id}: {command} (Python {session.python_version})")


def render_text(summary: Summary, top: int = DEFAULT_TOP) -> str:
    recording = summary.recording
    count = len(recording.episodes)
    lines = [f"loopwatch report: {one_line(recording.path)}"]
    facts = [
        plural(len(summary.process_ids), "process", "processes"),
        plural(count, "episode"),
        f"{format_blocked(summary.blocked_ms)} blocked",
    ]
    lines.append("  " + ", ".join(facts))
    if summary.first_at is not None:
        lines.append(f"  from {time_range(summary)}")
    for session in recording.sessions[:3]:
        lines.append(f"  {describe_session(session)}")
    if len(recording.sessions) > 3:
        lines.append(f"  ... and {len(recording.sessions) - 3} more processes")
    if not count:
        lines.append("")
        lines.append("No episodes: nothing blocked the loop past the threshold while recording.")
        lines += _unfinished_stalls_text(recording)
        return "\n".join(lines) + "\n"

    shown = summary.culprits[:top]
    lines += ["", _TABLE_HEADER]
    for rank, c in enumerate(shown, 1):
        lines.append(
            f"{rank:>3}  {shorten(c.culprit, NAME_WIDTH):<{NAME_WIDTH}} {c.count:>6,} {c.total_ms:>9.1f} "
            f"{c.share:>6.1%} {c.p50_ms:>7.1f} {c.p99_ms:>7.1f} {c.max_ms:>7.1f}"
        )
        lines.append(f"     {where_in_user_code(c.worst)}")
    rest = summary.culprits[top:]
    if rest:
        rest_ms = math.fsum(c.total_ms for c in rest)
        lines.append(
            f"     ... {plural(len(rest), 'more culprit')} ({format_blocked(rest_ms)}, "
            f"{rest_ms / summary.blocked_ms if summary.blocked_ms else 0:.1%}); --top {len(summary.culprits)}"
            " shows all"
        )
    lines.append("     times in ms; p50/p99: nearest-rank percentiles of each culprit's episodes")

    lines += ["", "Worst episode of each culprit:"]
    for rank, c in enumerate(shown, 1):
        worst = c.worst
        lines.append("")
        lines.append(
            f"{rank}. {one_line(c.culprit)}: {worst.duration_ms:.1f} ms at "
            f"{local_time(worst.timestamp, with_date=True, millis=True)}, pid {worst.process_id}"
        )
        lines += ["   " + one_line(line) for line in worst.format(max_frames=STACK_FRAMES).splitlines()]
    lines += _unfinished_stalls_text(recording)
    return "\n".join(lines) + "\n"


def _unfinished_stalls_text(recording: Recording) -> list[str]:
    """The stalls reported while they ran that no report of their end follows: hangs first."""
    stalls = recording.unfinished_stalls
    if not stalls:
        return []
    lines = [
        "",
        f"{plural(len(stalls), 'stall')} reported while running with no report of its end "
        "(still running when the recording stopped, or ended with nothing to blame):",
    ]
    for stall in sorted(stalls, key=lambda s: -s.so_far_ms):
        lines.append("")
        lines.append(
            f"- pid {stall.process_id}, thread {one_line(stall.thread_name)!r}: blocked for at least "
            f"{stall.so_far_ms:.0f} ms from {local_time(stall.timestamp, with_date=True, millis=True)}"
        )
        lines += ["  " + one_line(line) for line in stall.format(max_frames=STACK_FRAMES).splitlines()[1:]]
    return lines


# ---- JSON ----------------------------------------------------------------------------------------

JSON_VERSION = 1


def _ms(value: float) -> float:
    return round(value, 3)  # microseconds: the clock's useful precision, without float noise


def _example(info: BlockingCallInfo) -> dict[str, Any]:
    return {
        "timestamp": info.timestamp,
        "duration_ms": _ms(info.duration_ms),
        "culprit_duration_ms": _ms(info.culprit_duration_ms),
        "kind": info.kind,
        "process_id": info.process_id,
        "thread_id": info.thread_id,
        "task_name": info.task_name,
        "context": {str(k): str(v) for k, v in info.context.items()} if info.context else None,
        "filename": info.filename,
        "lineno": info.lineno,
        "where": info.where,
        "via": info.via,
        "stack": [
            {
                "name": frame.name,
                "filename": frame.filename,
                "lineno": frame.lineno,
                "end_lineno": frame.end_lineno,
                "duration_ms": _ms(frame.duration_ms),
                "is_c_call": frame.is_c_call,
                "is_coroutine": frame.is_coroutine,
                "is_user_code": frame.is_user_code,
            }
            for frame in info.stack
        ],
    }


def render_json(summary: Summary, top: int = DEFAULT_TOP) -> dict[str, Any]:
    """The ``--json`` document (described in this module's docstring)."""
    recording = summary.recording
    return {
        "format": "loopwatch-report",
        "version": JSON_VERSION,
        "file": recording.path,
        "problem": recording.problem,
        "sessions": [
            {
                "process_id": s.process_id,
                "argv": list(s.argv),
                "started_at": s.started_at,
                "python_version": s.python_version,
                "loopwatch_version": s.loopwatch_version,
            }
            for s in recording.sessions
        ],
        "processes": len(summary.process_ids),
        "episodes": len(recording.episodes),
        "steps": summary.steps,
        "blocked_ms": _ms(summary.blocked_ms),
        "first_at": summary.first_at,
        "last_at": summary.last_at,
        "percentiles": "nearest-rank",
        "unfinished_stalls": [
            {
                "process_id": stall.process_id,
                "thread_id": stall.thread_id,
                "thread_name": stall.thread_name,
                "started_at": stall.timestamp,
                "so_far_ms": _ms(stall.so_far_ms),
                "reports": stall.number,
                "stack": [list(frame) for frame in stall.stack],
            }
            for stall in recording.unfinished_stalls
        ],
        "culprits_total": len(summary.culprits),
        "culprits": [
            {
                "rank": rank,
                "culprit": c.culprit,
                "is_c_call": c.worst.is_c_call,
                "kinds": dict(c.kinds),
                "count": c.count,
                "total_ms": _ms(c.total_ms),
                "share": round(c.share, 6),
                "p50_ms": _ms(c.p50_ms),
                "p99_ms": _ms(c.p99_ms),
                "max_ms": _ms(c.max_ms),
                "cpu_wait_ms": _ms(c.cpu_wait_ms),
                "gc_ms": _ms(c.gc_ms),
                "example": _example(c.worst),
            }
            for rank, c in enumerate(summary.culprits[:top], 1)
        ],
    }


# ---- the command ---------------------------------------------------------------------------------


def _top(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a recording (made with record_to= or --record)")
    parser.add_argument(
        "--top",
        metavar="N",
        type=_top,
        default=DEFAULT_TOP,
        help=f"show the N culprits with the most blocked time (default {DEFAULT_TOP})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument(
        "--html",
        metavar="OUT",
        help="write a self-contained page (timeline, chart, stacks) to OUT instead of the table",
    )


class Progress:
    """One updating line on stderr while a person waits: only on a terminal, only for big files,
    and erased when done so the output reads as if it had never been there."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self._stream = stream
        self._enabled = enabled
        self._shown = False
        self._last = 0.0

    @classmethod
    def for_file(cls, path: str, stream: TextIO) -> Progress:
        try:
            big = os.path.getsize(os.path.expanduser(path)) >= PROGRESS_FROM_BYTES
        except OSError:
            big = False  # the reader says what is wrong with the file
        tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        return cls(stream, big and tty)

    def _show(self, text: str) -> None:
        # \r back to the line's start, \x1b[K erases what a longer previous text left behind.
        self._stream.write(f"\rloopwatch: {text}\x1b[K")
        self._stream.flush()
        self._shown = True

    def reading(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._enabled or (self._shown and now - self._last < 0.1 and done < total):
            return
        self._last = now
        self._show(f"reading {done * 100 // max(total, 1)}%")

    def phase(self, text: str) -> None:
        if self._enabled:
            self._show(text)

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory, so a reader (a
    browser reloading the page) never sees half a file and a failure leaves the old one."""
    target = os.path.expanduser(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, temporary = tempfile.mkstemp(prefix=".loopwatch-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        try:
            mode = os.stat(target).st_mode & 0o777
        except OSError:  # a new file: what the umask allows, as open() would give it
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise


def _error(message: str) -> None:
    sys.stderr.write(f"loopwatch: error: {one_line(message)}\n")
    sys.stderr.flush()


def _print(text: str, stream: Optional[TextIO] = None) -> None:
    """Writes all of `text`. Under ``PYTHONUNBUFFERED`` (common in containers) ``sys.stdout`` writes
    straight to the file, where one write may take only part of a long report and the text layer
    drops the rest without a word; so the bytes go out in a loop until all are taken."""
    stream = stream or sys.stdout
    stream.flush()
    binary = getattr(stream, "buffer", None)
    if binary is None:  # a text-only stream (a StringIO standing in for stdout)
        stream.write(text)
        return
    if os.linesep != "\n":
        text = text.replace("\n", os.linesep)
    data = memoryview(text.encode(stream.encoding or "utf-8", errors="backslashreplace"))
    while data:
        data = data[binary.write(data) or 0 :]
    binary.flush()


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:
        return False


def main(args: argparse.Namespace) -> int:
    if args.html is not None and _same_file(args.html, args.file):
        _error(f"--html {args.html} would overwrite the recording it reports on")
        return EXIT_ERROR
    progress = Progress.for_file(args.file, sys.stderr)
    try:
        try:
            # Only each culprit's worst stack is shown: the others are not kept (a fifth of the memory).
            recording = read_recording(args.file, progress=progress.reading, stacks="worst")
        except RecordingError as error:
            progress.clear()
            _error(str(error))
            return EXIT_ERROR
        progress.phase(f"rendering {plural(len(recording.episodes), 'episode')}")
        summary = summarize(recording)
        if args.html is not None:
            from loopwatch import _html

            page = _html.render_html(summary, top=args.top)
            try:
                write_atomically(args.html, page)
            except OSError as error:
                progress.clear()
                _error(f"cannot write {args.html}: {error.strerror or error}")
                return EXIT_ERROR
        if args.json:
            import json

            text = json.dumps(render_json(summary, top=args.top), indent=2, ensure_ascii=False) + "\n"
        elif args.html is None:
            text = render_text(summary, top=args.top)
        else:
            text = ""
        progress.clear()
        if args.html is not None:
            wrote = (
                f"loopwatch: wrote {args.html} ({plural(len(recording.episodes), 'episode')}, "
                f"{plural(len(summary.culprits), 'culprit')})\n"
            )
            # With --json, stdout holds only the document.
            _print(wrote, sys.stderr if args.json else sys.stdout)
        _print(text)
    except KeyboardInterrupt:
        progress.clear()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly. Point stdout at devnull so the
        # interpreter's final flush does not complain about the pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    if recording.problem:
        _error(recording.problem)
        return EXIT_ERROR
    return EXIT_OK
