"""What must never raise an alarm: the loop's idle wait, awaiting, other threads, no running loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time

from conftest import BLOCK_S, busy, monitor


def test_awaiting_sleep_executors_and_threads_is_not_blocking(run):
    ctx, reports = monitor()

    async def main():
        with ctx:
            await asyncio.sleep(BLOCK_S * 2)
            await asyncio.to_thread(time.sleep, BLOCK_S * 2)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                await asyncio.get_running_loop().run_in_executor(pool, busy, BLOCK_S * 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.Event().wait(), BLOCK_S * 2)

    run(main)
    assert reports == []


def test_work_in_other_threads_is_not_reported(run):
    ctx, reports = monitor()
    stop = threading.Event()

    def other():
        while not stop.is_set():
            time.sleep(BLOCK_S)
            busy(BLOCK_S)

    async def main():
        thread = threading.Thread(target=other)
        with ctx:
            thread.start()
            for _ in range(20):
                await asyncio.sleep(0.02)
        stop.set()
        thread.join()

    run(main)
    assert reports == []


def test_code_that_runs_while_no_loop_is_running_is_not_reported(run):
    ctx, reports = monitor()

    async def main():
        await asyncio.sleep(0)

    with ctx:
        time.sleep(BLOCK_S)
        busy(BLOCK_S)
        run(main)
        time.sleep(BLOCK_S)
    assert reports == []


def test_a_coroutine_driven_by_hand_outside_a_loop_is_not_reported():
    ctx, reports = monitor()

    async def work():
        time.sleep(BLOCK_S)

    with ctx:
        coroutine = work()
        with contextlib.suppress(StopIteration):
            coroutine.send(None)
    assert reports == []


def test_monitor_around_the_whole_run_reports_only_the_blocking_call(run):
    ctx, reports = monitor()

    async def main():
        await asyncio.sleep(BLOCK_S * 2)
        time.sleep(BLOCK_S)
        await asyncio.sleep(BLOCK_S * 2)

    with ctx:
        run(main)
    assert [r.method_name for r in reports] == ["time.sleep"]


def test_asyncio_machinery_is_never_in_the_stack(run):
    ctx, reports = monitor()

    def on_tick():
        time.sleep(BLOCK_S)

    async def main():
        asyncio.get_running_loop().call_soon(on_tick)
        await asyncio.sleep(BLOCK_S * 2)
        time.sleep(BLOCK_S)

    with ctx:
        run(main)
    assert len(reports) == 2
    for info in reports:
        for frame in info.stack:
            assert not frame.name.startswith(("asyncio.", "uvloop.", "_contextvars", "loopwatch."))
