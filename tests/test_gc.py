"""Garbage collection inside a step: a collection the interpreter runs while the step's code
allocates holds the loop as surely as the code does, but the code is not to blame. loopwatch
times each collection on the loop's thread and takes it off before it blames a frame: a step
over the threshold only because of a collection names the collection, and every report says how
long collections took (``gc_ms``)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import monitor, names, short
from loopwatch import _native, read_recording

pytestmark = pytest.mark.usefixtures("backend")

THRESHOLD_MS = 10.0


def collection_of(n: int) -> float:
    """How long (ms) the collection of `n` young objects takes here, measured, not guessed."""
    took: list[float] = []

    def timer(phase: str, info: dict) -> None:
        took.append(time.perf_counter())

    gc.collect()
    gc.disable()
    try:
        young = [[] for _ in range(n)]
        gc.callbacks.append(timer)
        gc.collect(0)
    finally:
        gc.callbacks.remove(timer)
        gc.enable()
    del young
    return (took[-1] - took[0]) * 1e3


@pytest.fixture
def young_heap() -> Iterator[list[list[None]]]:
    """Enough young objects that collecting them takes four thresholds, made with the collector
    off: the first allocation after `gc.enable()` collects them all at once (before 3.12 in that
    allocation, from 3.12 at the interpreter's next check)."""
    per_object = collection_of(200_000) / 200_000
    n = int(4 * THRESHOLD_MS / per_object)
    gc.collect()
    gc.disable()
    try:
        yield [[None] for _ in range(n)]
    finally:
        gc.enable()


def allocate() -> list[list[None]]:
    # A few container objects and a loop: the collection starts in here, on every version.
    made = []
    for _ in range(10):
        made.append([None])
    return made


def collect_in_a_step(run, ctx, before: Callable[[], object] = lambda: None) -> None:
    """Runs one monitored step that does `before`, then turns the collector back on and
    allocates: the young heap is collected inside the step."""

    async def main():
        with ctx:
            await asyncio.sleep(0)
            before()
            gc.enable()
            allocate()
            await asyncio.sleep(0)

    run(main)


def test_a_step_over_the_threshold_only_because_of_a_collection_names_the_collection(run, young_heap):
    ctx, reports = monitor(threshold_ms=THRESHOLD_MS)

    collect_in_a_step(run, ctx)
    assert [(r.kind, r.method_name.startswith("garbage collection (generation ")) for r in reports] == [
        ("gc", True)
    ], [r.format() for r in reports]
    report = reports[0]
    assert report.gc_ms >= 2 * THRESHOLD_MS
    assert report.duration_ms - report.gc_ms - report.cpu_wait_ms < THRESHOLD_MS
    assert report.culprit_duration_ms == report.gc_ms
    # The frames it interrupted say where it happened; the collection is last.
    assert "main" in [short(name) for name in names(report)]
    assert report.stack[-1].name == report.method_name
    assert "no code is to blame" in report.headline()


def test_a_real_block_beside_a_collection_is_blamed_and_says_how_long_collections_took(run, young_heap):
    ctx, reports = monitor(threshold_ms=THRESHOLD_MS)

    collect_in_a_step(run, ctx, before=lambda: time.sleep(0.05))
    assert [(r.kind, r.method_name) for r in reports] == [("call", "time.sleep")]
    assert reports[0].gc_ms >= 2 * THRESHOLD_MS
    assert reports[0].duration_ms >= 50 + reports[0].gc_ms * 0.9


def test_the_collection_timer_is_in_gc_callbacks_only_while_a_thread_is_watched():
    def timers() -> int:
        return sum(callback is _native._gc_callback for callback in gc.callbacks)

    ours = []

    def program_callback(phase: str, info: dict) -> None:
        ours.append(phase)

    gc.callbacks.append(program_callback)
    try:
        assert timers() == 0
        ctx, _ = monitor()
        outer, _ = monitor()
        with outer:
            with ctx:
                assert timers() == 1
            assert timers() == 1
        assert timers() == 0
        assert program_callback in gc.callbacks, "the program's own callback is left alone"
    finally:
        gc.callbacks.remove(program_callback)


def test_a_collection_report_reads_back_from_a_recording(run, young_heap, tmp_path):
    path = tmp_path / "gc.lwrec"
    ctx, reports = monitor(threshold_ms=THRESHOLD_MS, record_to=path, report_stalls=False)

    collect_in_a_step(run, ctx)
    recorded = list(read_recording(path).episodes)
    assert [(r.kind, r.method_name, r.gc_ms) for r in recorded] == [
        (r.kind, r.method_name, r.gc_ms) for r in reports
    ]
    assert recorded[0].kind == "gc" and recorded[0].gc_ms >= 2 * THRESHOLD_MS


def test_a_stall_reported_while_a_collection_runs_says_so(run, young_heap, tmp_path):
    path = tmp_path / "stall.lwrec"
    stalls = []
    ctx, _ = monitor(threshold_ms=THRESHOLD_MS, on_stall=stalls.append, record_to=path)

    collect_in_a_step(run, ctx)
    # The collection starts as the step does and runs four thresholds: the first report, at the
    # threshold, is made while it runs.
    deadline = time.monotonic() + 5
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stalls and stalls[0].in_gc, stalls
    assert "still running, in a garbage collection, at " in stalls[0].format()
    assert [stall.in_gc for stall in read_recording(path).stalls][:1] == [True]
