"""The per-culprit rate limit: a storm of identical episodes must not flood logs or callbacks.
What is held back is counted, and the count rides on the next report of that culprit."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Optional

DEFAULT_THRESHOLD_MS = 50.0
"""A step or callback that keeps the loop this long is reported, unless told otherwise."""
DEFAULT_REPORTS_PER_MINUTE = 10
WINDOW_S = 60.0
# Culprits remembered at once; the least recently reported are forgotten first.
MAX_CULPRITS = 1024


def check_reports_per_minute(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"reports_per_minute must be a whole number >= 1, or None for no limit, got {value!r}"
        )
    return value


class CulpritRateLimit:
    """At most `limit` reports per culprit per minute (a fixed window from the first report)."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        # culprit -> [window start, reports let through in the window, held back since the last one]
        self._culprits: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def admit(self, culprit: tuple[str, str]) -> Optional[int]:
        """The number held back before this one if it may be reported now, else None."""
        now = self._clock()
        state = self._culprits.get(culprit)
        if state is None:
            state = self._culprits[culprit] = [now, 0, 0]
            if len(self._culprits) > MAX_CULPRITS:
                self._culprits.popitem(last=False)
        self._culprits.move_to_end(culprit)
        if now - state[0] >= WINDOW_S:
            state[0], state[1] = now, 0
        if state[1] >= self.limit:
            state[2] += 1
            return None
        state[1] += 1
        held_back, state[2] = int(state[2]), 0
        return held_back
