"""A busy machine is not blocking code: when the loop's thread is ready to run but gets no CPU,
the wait is measured (Linux) and taken off before the code is blamed. The contention is real:
the test's thread and CPU-bound processes are pinned to one CPU."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import monitor

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "sched_setaffinity"),
    reason="the wait for a CPU is read from Linux's per-thread scheduler statistics",
)

THRESHOLD_MS = 20.0


@contextlib.contextmanager
def sharing_one_cpu_with(hogs: int) -> Iterator[None]:
    """Pins the calling thread to one CPU, together with `hogs` processes that never sleep."""
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        for process in processes:
            os.sched_setaffinity(process.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # 0: the calling thread only
        time.sleep(0.2)  # the hogs are running
        yield
    finally:
        os.sched_setaffinity(0, saved)
        for process in processes:
            process.kill()
            process.wait()


def burn_cpu(ms: float) -> None:
    """Runs until this thread has had `ms` of CPU, however long that takes on the wall clock."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


def test_steps_slow_only_for_want_of_a_cpu_are_not_blamed_on_code(caplog: pytest.LogCaptureFixture) -> None:
    walls: list[float] = []

    async def main() -> None:
        for _ in range(20):
            started = time.perf_counter()
            burn_cpu(THRESHOLD_MS / 4)
            walls.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0)

    context, reports = monitor(threshold_ms=THRESHOLD_MS)
    caplog.set_level(logging.WARNING, logger="loopwatch")
    with sharing_one_cpu_with(hogs=5), context:
        asyncio.run(main())
    # Each of these would have been blamed on `burn_cpu` by its wall time alone.
    stalled = [wall for wall in walls if wall >= THRESHOLD_MS * 1.1]
    if not stalled:
        pytest.skip(f"the scheduler never kept the thread from its CPU long enough: {walls}")
    assert reports == [], [r.format() for r in reports]
    # One line that says whose it is, as loopwatch run prints it on stderr among the program's own.
    assert any(
        record.getMessage().startswith("loopwatch: the event loop's thread got no CPU")
        for record in caplog.records
    ), caplog.text


def test_a_real_block_on_a_busy_machine_is_reported_with_its_wait() -> None:
    async def main() -> None:
        burn_cpu(THRESHOLD_MS * 2)

    context, reports = monitor(threshold_ms=THRESHOLD_MS)
    with sharing_one_cpu_with(hogs=3), context:
        asyncio.run(main())
    [report] = reports
    assert report.method_name.endswith("burn_cpu")
    # The code's own time is never understated: at least the CPU it burned.
    assert report.duration_ms - report.cpu_wait_ms >= THRESHOLD_MS * 2
    if report.duration_ms < THRESHOLD_MS * 2.5:
        pytest.skip(f"the scheduler hardly kept the thread from its CPU: {report.duration_ms:.1f} ms")
    assert report.cpu_wait_ms > 0
    assert "waited for a CPU" in report.format()
