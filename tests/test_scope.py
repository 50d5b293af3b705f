"""monitor_current_task: only the task it is entered in (and tasks it creates) is reported, with its
context, however the loop interleaves tasks; the hook is off when no scope is open."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import BLOCK_S, THRESHOLD_MS, short, watched
from loopwatch import BlockingCallInfo, monitor_current_task


def blocking_in_a():
    time.sleep(BLOCK_S)


def blocking_in_b():
    time.sleep(BLOCK_S)


def blocking_unmonitored():
    time.sleep(BLOCK_S)


async def monitored(name: str, blocker, reports: list[BlockingCallInfo]) -> None:
    async with monitor_current_task(
        threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, context={"request": name}
    ):
        await asyncio.sleep(0)
        blocker()
        await asyncio.sleep(0.01)
        blocker()


async def unmonitored() -> None:
    for _ in range(3):
        await asyncio.sleep(0.005)
        blocking_unmonitored()


def test_each_report_goes_to_the_scope_whose_task_it_blocked(run):
    reports_a: list[BlockingCallInfo] = []
    reports_b: list[BlockingCallInfo] = []

    async def main():
        await asyncio.gather(
            monitored("a", blocking_in_a, reports_a), unmonitored(), monitored("b", blocking_in_b, reports_b)
        )

    run(main)
    for reports, name, blocker in ((reports_a, "a", "blocking_in_a"), (reports_b, "b", "blocking_in_b")):
        assert len(reports) == 2, [r.headline() for r in reports]
        for report in reports:
            assert report.context == {"request": name}
            assert report.method_name == "time.sleep"
            assert short(report.stack[-2].name) == blocker
            assert report.duration_ms >= BLOCK_S * 1000


def test_tasks_created_inside_the_scope_belong_to_it(run):
    reports: list[BlockingCallInfo] = []

    async def spawned():
        blocking_in_b()

    async def main():
        scope = monitor_current_task(
            threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, context={"job": 7}
        )
        async with scope:
            await asyncio.create_task(spawned())

    run(main)
    assert [short(r.stack[-2].name) for r in reports] == ["blocking_in_b"]
    assert reports[0].context == {"job": 7}


def test_the_hook_is_on_only_while_a_scope_is_open(run):
    seen = []

    async def main():
        seen.append(watched())
        async with monitor_current_task(threshold_ms=THRESHOLD_MS, on_blocking_call=lambda info: None):
            seen.append(watched())
        seen.append(watched())

    run(main)
    assert seen[0] is None and seen[2] is None
    assert seen[1] is not None


def test_a_scope_must_be_entered_inside_a_task():
    with pytest.raises(RuntimeError, match="inside an asyncio task"), monitor_current_task():
        pass


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="context must be a mapping"):
        monitor_current_task(context=["not", "a", "mapping"])
    with pytest.raises(ValueError, match="threshold_ms must be > 0"):
        monitor_current_task(threshold_ms=0)
