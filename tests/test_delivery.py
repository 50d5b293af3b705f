"""How reports reach the callbacks: right after the blocking step, as a loop callback of their own
with the hook paused, through a bounded queue; everything waiting is delivered by deactivate()."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from conftest import BLOCK_S, THRESHOLD_MS, busy
from loopwatch import BlockingCallInfo, EventLoopMonitor, _monitor


def blocking_step():
    time.sleep(BLOCK_S)


def test_a_slow_callback_is_not_reported_as_the_programs_own(run):
    reports: list[BlockingCallInfo] = []

    def slow_callback(info: BlockingCallInfo) -> None:
        reports.append(info)
        busy(THRESHOLD_MS * 2 / 1000)  # the callback's own work, over the threshold

    async def main():
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=slow_callback):
            blocking_step()
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)

    run(main)
    assert [report.stack[-2].name.rsplit(".", 1)[-1] for report in reports] == ["blocking_step"]


def test_the_callbacks_run_after_the_step_in_the_blocked_tasks_context(run):
    request = contextvars.ContextVar("request", default=None)
    seen: list[tuple[object, bool]] = []

    def callback(info: BlockingCallInfo) -> None:
        seen.append((request.get(), asyncio.current_task() is None))

    async def handler():
        request.set("r-42")
        blocking_step()
        await asyncio.sleep(0.01)

    async def main():
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=callback):
            await asyncio.create_task(handler())

    run(main)
    assert seen == [("r-42", True)]


def test_reports_past_the_queue_bound_are_dropped_and_counted(run, monkeypatch, caplog):
    monkeypatch.setattr(_monitor, "MAX_PENDING_REPORTS", 2)
    reports: list[BlockingCallInfo] = []

    async def blocker():
        # Well over the threshold, so that a busy machine cannot make a kept report a starved step.
        busy(BLOCK_S)

    async def main():
        with EventLoopMonitor(
            threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, reports_per_minute=None
        ):
            # Five first steps are ready before the delivery that the first one schedules.
            await asyncio.gather(*(blocker() for _ in range(5)))

    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        run(main)
    assert len(reports) == 2
    assert "loopwatch dropped 3 reports" in caplog.text


def test_deactivate_delivers_what_is_waiting_before_it_returns(run):
    reports: list[BlockingCallInfo] = []

    async def main():
        monitor = EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append)
        monitor.activate()
        await asyncio.sleep(0)
        blocking_step()
        monitor.deactivate()
        return len(reports)

    assert run(main) == 1


def test_the_timestamp_is_when_the_episode_started(run):
    reports: list[BlockingCallInfo] = []

    async def main():
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append):
            before = time.time()
            blocking_step()
            await asyncio.sleep(0.05)  # delivery happens meanwhile, after the step
            return before

    before = run(main)
    assert abs(reports[0].timestamp - before) < 0.02
