"""Watching a program never changes when its objects are finalized: loopwatch keeps nothing of
a blocking function's frame once it has named it, and allocates nothing that moves the cyclic
collector's runs."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest
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


BLOCK_S = 0.03  # over the monitors' 10 ms threshold, so every slow path runs: naming, stacks, reports


class Resource:
    """Says when it is finalized, in the program's order of events."""

    def __init__(self, events: list[str], name: str) -> None:
        self.events = events
        self.name = name

    def __del__(self) -> None:
        self.events.append(f"finalized {self.name}")


class Service:
    async def serve(self, events: list[str], i: int) -> None:
        conn = Resource(events, f"local of a method {i}")
        time.sleep(BLOCK_S)  # the method's frame is named while it still runs
        del conn
        events.append(f"deleted local {i}")
        await asyncio.sleep(0)
        events.append(f"method resumed {i}")


async def worker(events: list[str], i: int) -> None:
    time.sleep(BLOCK_S)
    try:
        raise ValueError(Resource(events, f"exception argument {i}"))
    except ValueError:
        pass
    events.append(f"exception handled {i}")
    await asyncio.sleep(0)
    time.sleep(BLOCK_S)


def blocking_callback(events: list[str], resource: Resource) -> None:
    time.sleep(BLOCK_S)
    events.append(f"callback ran with {resource.name}")


async def program(events: list[str]) -> None:
    loop = asyncio.get_running_loop()
    service = Service()
    for i in range(2):
        task = asyncio.ensure_future(worker(events, i))
        await task
        del task
        events.append(f"task {i} awaited")
        await service.serve(events, i)
        # A callback that blocks, then this task's next step in the same turn of the loop: its
        # handle (and the argument it holds) goes as the loop takes the next one.
        loop.call_soon(blocking_callback, events, Resource(events, f"callback argument {i}"))
        await asyncio.sleep(0)
        events.append(f"step after the callback {i}")
        await asyncio.sleep(0)
        future = loop.create_future()
        future.set_result(Resource(events, f"future result {i}"))
        await future
        del future
        events.append(f"future awaited {i}")


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def events_of(run: Callable[..., Any], watched: bool) -> list[str]:
    events: list[str] = []

    async def main() -> None:
        if not watched:
            await program(events)
            return
        ctx, _ = monitor(threshold_ms=10)
        with ctx:
            await program(events)

    run(main)
    return events


@pytest.mark.usefixtures("backend", "no_cyclic_collector")
def test_objects_are_finalized_exactly_when_they_would_be_without_loopwatch_in_every_mode(
    run: Callable[..., Any],
) -> None:
    # Every kind of reference a blocking program hands around: a method's local, an exception's
    # argument, a callback's argument (its handle), a future's result; each used by a step over
    # the threshold, so every slow path of each mode runs. On 3.12 the always-on mode read the
    # handle that ran through `_run_once`'s `f_locals`, whose snapshot kept the previous handle
    # alive until the loop's turn ended: a callback's argument was finalized a step late.
    unwatched = events_of(run, watched=False)
    watched = events_of(run, watched=True)
    assert sum(event.startswith("finalized") for event in unwatched) == 8
    assert watched == unwatched
