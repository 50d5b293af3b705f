"""Watching a program never changes when its objects are finalized: loopwatch keeps nothing of
a blocking function's frame once it has named it, and allocates nothing that moves the cyclic
collector's runs."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any, Callable

from conftest import monitor, names, short


class Connection:
    """Stands for a socket or a file: what its finalizer does must happen when the program
    drops the last reference, not later."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __del__(self) -> None:
        self.events.append("finalized")


class Handler:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def handle(self) -> None:
        connection = Connection(self.events)
        time.sleep(0.08)  # blocks: an episode, whose stack names this method
        await asyncio.sleep(0)
        self.events.append("deleting")
        del connection
        self.events.append("deleted")
        await asyncio.sleep(0)
        self.events.append("method still running")


def test_an_object_a_method_deletes_after_it_blocked_is_finalized_at_once(run: Callable[..., Any]) -> None:
    # Before 3.11, naming the method (`Handler.handle`) reads `self` from the frame's locals; the
    # snapshot CPython made for that kept `connection` alive until the coroutine ended.
    events: list[str] = []
    ctx, reports = monitor(threshold_ms=40)

    async def main() -> None:
        with ctx:
            await Handler(events).handle()

    run(main)
    assert len(reports) == 1
    stack = names(reports[0])
    assert any(short(name) == "handle" and "Handler.handle" in name for name in stack), stack
    assert events == ["deleting", "finalized", "deleted", "method still running"]


def test_nothing_of_a_blocking_function_outlives_it(run: Callable[..., Any]) -> None:
    kept: list[weakref.ref[Any]] = []

    def blocks() -> None:
        payload = Connection([])
        kept.append(weakref.ref(payload))
        try:
            raise ValueError("handled here")
        except ValueError:
            time.sleep(0.08)  # an episode inside an except block: its traceback is live

    ctx, reports = monitor(threshold_ms=40)

    async def main() -> bool:
        with ctx:
            blocks()
            await asyncio.sleep(0)  # the step ends: the episode is reported
            return kept[0]() is None

    assert run(main) is True
    assert len(reports) == 1


def collector_runs(work: Callable[[], None]) -> int:
    runs = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal runs
        runs += phase == "start"

    gc.collect()
    gc.callbacks.append(count)
    try:
        work()
    finally:
        gc.callbacks.remove(count)
    return runs


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_monitoring_does_not_change_how_often_the_collector_runs() -> None:
    # 40,000 loop steps that each leave a cycle for the collector, none of them blocking: a
    # Python object made per step or per call would add a collection every ~700 steps (every
    # ~2,000 on 3.14's incremental collector).
    async def steps() -> None:
        async def worker() -> None:
            for _ in range(2000):
                Cycle()
                await asyncio.sleep(0)

        await asyncio.gather(*(worker() for _ in range(20)))

    async def monitored() -> None:
        ctx, reports = monitor(threshold_ms=1000)
        with ctx:
            await steps()
        assert reports == []

    plain = collector_runs(lambda: asyncio.run(steps()))
    watched = collector_runs(lambda: asyncio.run(monitored()))
    assert plain >= 10
    assert abs(watched - plain) <= 2, (plain, watched)
