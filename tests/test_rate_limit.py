"""A storm of identical episodes is held to a few reports per culprit per minute, and what was held
back is counted on the next report of that culprit."""

from __future__ import annotations

import asyncio
import time

import pytest
from loopwatch import BlockingCallInfo, EventLoopMonitor
from loopwatch._limits import CulpritRateLimit


def storm_blocker():
    time.sleep(0.004)


def other_blocker():
    time.sleep(0.004)


def test_a_storm_of_identical_episodes_is_held_to_the_limit(run):
    reports: list[BlockingCallInfo] = []

    async def main():
        with EventLoopMonitor(threshold_ms=2, on_blocking_call=reports.append, reports_per_minute=3):
            for _ in range(30):
                storm_blocker()
                await asyncio.sleep(0)
            other_blocker()
            await asyncio.sleep(0)

    run(main)
    sleeps = [report for report in reports if report.method_name == "time.sleep"]
    assert [report.stack[-2].name.rsplit(".", 1)[-1] for report in sleeps] == ["storm_blocker"] * 3
    # The limit is per culprit (time.sleep, a call), so the other caller's episode is held back too.


def test_different_culprits_have_their_own_limits(run):
    reports: list[BlockingCallInfo] = []

    async def main():
        with EventLoopMonitor(threshold_ms=2, on_blocking_call=reports.append, reports_per_minute=2):
            for _ in range(5):
                time.sleep(0.004)
                await asyncio.sleep(0)
            for _ in range(5):
                deadline = time.perf_counter() + 0.004
                while time.perf_counter() < deadline:
                    pass
                await asyncio.sleep(0)

    run(main)
    kinds = [(report.kind, report.method_name.rsplit(".", 1)[-1]) for report in reports]
    assert kinds.count(("call", "sleep")) == 2
    assert kinds.count(("step", "main")) == 2


def test_what_was_held_back_rides_on_the_next_report():
    now = [0.0]
    limit = CulpritRateLimit(2, clock=lambda: now[0])
    culprit = ("time.sleep", "call")
    assert [limit.admit(culprit) for _ in range(5)] == [0, 0, None, None, None]
    assert limit.admit(("json.dumps", "call")) == 0
    now[0] = 61.0  # a new minute
    assert limit.admit(culprit) == 3
    assert limit.admit(culprit) == 0


def test_no_limit_reports_everything(run):
    reports: list[BlockingCallInfo] = []

    async def main():
        with EventLoopMonitor(threshold_ms=2, on_blocking_call=reports.append, reports_per_minute=None):
            for _ in range(15):
                storm_blocker()
                await asyncio.sleep(0)

    run(main)
    # Every step's block, none held back. (At 2 ms a busy machine can make a second call of a
    # step a culprit of its own too: a report more, of the same episode.)
    assert len({info.episode_id for info in reports}) == 15
    assert sum(info.method_name == "time.sleep" for info in reports) >= 15


def test_a_bad_limit_is_refused():
    with pytest.raises(ValueError, match="reports_per_minute must be a whole number >= 1"):
        EventLoopMonitor(reports_per_minute=0)
