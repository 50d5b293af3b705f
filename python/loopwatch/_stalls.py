"""Stalls reported while they ran: what loopwatch's watchdog thread writes, without Python, when a
step has run past the threshold and is still running (to stderr, and to the recordings of the
monitors that record). The report made when the step ends, if it ends, counts them in
``BlockingCallInfo.reports_while_running``; a recording shows the stalls that never ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["StallInfo"]


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
            f"and was still running, at {self.where}"
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
