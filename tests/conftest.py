"""Shared helpers: run a coroutine on each kind of loop, and collect reports."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable
from typing import Any, Callable

import pytest
from loopwatch import BlockingCallInfo, event_loop_monitor_ctx

THRESHOLD_MS = 30.0
BLOCK_S = 0.1  # comfortably over the threshold, even on a busy machine

LOOPS = ["asyncio"]
try:
    import uvloop

    LOOPS.append("uvloop")
except ImportError:  # uvloop is a test dependency; without it only the default loop is tested
    uvloop = None


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run(loop_kind: str) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Runs `main()` to completion on a fresh loop of the parametrized kind."""

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        loop = new_loop(loop_kind)
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    return runner


def monitor(**kwargs: Any) -> tuple[Any, list[BlockingCallInfo]]:
    """A monitoring context whose reports land in the returned list."""
    reports: list[BlockingCallInfo] = []
    kwargs.setdefault("threshold_ms", THRESHOLD_MS)
    return event_loop_monitor_ctx(on_blocking_call=reports.append, **kwargs), reports


def names(info: BlockingCallInfo) -> list[str]:
    return [frame.name for frame in info.stack]


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def items_summed_in(seconds: float) -> int:
    """How many items `sum(range(n))` adds up in about `seconds` here: one C call that holds the
    GIL that long, measured on this machine and interpreter rather than guessed."""
    n = 1_000_000
    start = time.perf_counter()
    sum(range(n))
    return int(seconds / ((time.perf_counter() - start) / n))


def busy(seconds: float) -> int:
    """Holds the GIL in Python code for `seconds` (an inline CPU loop)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@pytest.fixture(autouse=True)
def no_profiler_left_behind():
    before = sys.getprofile()
    yield
    assert sys.getprofile() is before, "a test left a profile function installed"
