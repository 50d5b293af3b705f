"""The always-on mode (``mode="sampling"``): no profile hook; each callback or task step timed from
its start and end, blamed from the stack loopwatch's watchdog read while it ran. What it shares
with the exact mode is pinned in test_detection and test_filters_and_errors (conftest.BACKENDS);
here, what is its own. Real loops, real threads, real processes."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import C_LOOPS_BY_CONTEXT, LOOPS, clean_env, items_summed_in, line_of, new_loop, write
from loopwatch import (
    BlockingCallInfo,
    EventLoopMonitor,
    _native,
    event_loop_monitor_ctx,
    monitor_current_task,
)
from loopwatch._recording import read_recording

needs_stack_reads = pytest.mark.skipif(
    _native._stack_reads()[1] is not None, reason=f"stacks cannot be read here: {_native._stack_reads()[1]}"
)
SAMPLING = sys.version_info >= (3, 11)
needs_sampling = pytest.mark.skipif(not SAMPLING, reason="the always-on mode needs CPython 3.11+")
THRESHOLD_MS = 30.0


def sampling_monitor(**kwargs: Any) -> tuple[EventLoopMonitor, list[BlockingCallInfo]]:
    reports: list[BlockingCallInfo] = []
    kwargs.setdefault("threshold_ms", THRESHOLD_MS)
    kwargs.setdefault("report_stalls", False)
    return EventLoopMonitor(mode="sampling", on_blocking_call=reports.append, **kwargs), reports


@pytest.mark.skipif(SAMPLING, reason="before 3.11 only")
def test_before_3_11_the_always_on_mode_is_refused_with_why() -> None:
    with pytest.raises(ValueError, match=r"needs CPython 3\.11 or newer"):
        EventLoopMonitor(mode="sampling")


def test_an_unknown_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="mode must be 'exact' or 'sampling', got 'fast'"):
        EventLoopMonitor(mode="fast")
    with pytest.raises(ValueError, match="mode must be"):
        event_loop_monitor_ctx(mode=None)  # type: ignore[arg-type]


def sampler_tools() -> list[str]:
    if sys.version_info < (3, 12):
        return []
    return [sys.monitoring.get_tool(t) for t in range(6)]


@needs_sampling
@needs_stack_reads
def test_the_always_on_mode_installs_no_profile_hook_and_leaves_nothing_behind() -> None:
    monitor, _ = sampling_monitor()
    original = asyncio.events.Handle.__dict__["_run"]

    async def main() -> list[Any]:
        with monitor:
            run = asyncio.events.Handle.__dict__["_run"]
            return [sys.getprofile(), _native._watched(), sampler_tools(), run]

    profile, watched, tools, run = asyncio.run(main())
    assert profile is None and watched is None
    if sys.version_info >= (3, 12):
        # sys.monitoring events on asyncio's own code objects, under a tool id of its own.
        assert "loopwatch-sampler" in tools and "loopwatch" not in tools
        assert run is original
    else:
        # Before: a callable of its own in Handle._run's place, that calls it.
        assert type(run).__name__ == "TimedHandleRun"
    assert "loopwatch-sampler" not in sampler_tools()
    assert asyncio.events.Handle.__dict__["_run"] is original


@needs_sampling
@needs_stack_reads
def test_a_handle_run_the_program_replaced_meanwhile_is_left_in_place() -> None:
    monitor, _ = sampling_monitor()
    original = asyncio.events.Handle.__dict__["_run"]

    def replacement(self: Any) -> None:
        original(self)

    async def main() -> None:
        with monitor:
            asyncio.events.Handle._run = replacement  # type: ignore[method-assign]

    try:
        asyncio.run(main())
        assert asyncio.events.Handle.__dict__["_run"] is replacement
    finally:
        asyncio.events.Handle._run = original  # type: ignore[method-assign]


@needs_sampling
@needs_stack_reads
def test_a_blocking_call_is_named_at_its_line_with_its_real_duration() -> None:
    monitor, reports = sampling_monitor()
    took: list[float] = []

    def fetch() -> None:
        started = time.perf_counter()
        time.sleep(0.08)  # the blocking call
        took.append((time.perf_counter() - started) * 1000)

    async def handler() -> None:
        await asyncio.sleep(0)
        fetch()  # fetch called

    async def main() -> None:
        with monitor:
            await asyncio.create_task(handler(), name="request-7")
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(reports) == 1
    info = reports[0]
    assert (info.kind, info.method_name, info.is_c_call, info.sampled) == ("call", "time.sleep", True, True)
    assert (info.filename, info.lineno) == (__file__, line_of(Path(__file__), "the blocking call"))
    assert [frame.name.rsplit(".", 1)[-1] for frame in info.stack] == ["handler", "fetch", "sleep"]
    assert info.stack[0].is_coroutine and info.stack[0].lineno == line_of(Path(__file__), "fetch called")
    assert info.task_name == "request-7"
    # The step's own length, from its boundaries: the call plus what little ran around it.
    assert took[0] <= info.duration_ms <= took[0] + max(2.0, 0.1 * took[0])


@needs_sampling
@needs_stack_reads
def test_steps_and_callbacks_under_the_threshold_and_the_idle_loop_are_never_reported() -> None:
    monitor, reports = sampling_monitor()

    def short_callback() -> None:
        time.sleep(0.002)

    async def short_steps() -> None:
        for _ in range(100):
            time.sleep(0.002)
            await asyncio.sleep(0)

    async def main() -> None:
        with monitor:
            loop = asyncio.get_running_loop()
            for _ in range(100):
                loop.call_soon(short_callback)
            await asyncio.gather(*(short_steps() for _ in range(4)))
            await asyncio.sleep(0.3)  # the loop waits in its selector: idle, not blocked

    asyncio.run(main())
    assert reports == []


@needs_sampling
@needs_stack_reads
def test_a_watch_started_inside_a_step_times_that_step_to_its_end_for_its_task(capfd) -> None:
    # A request scope entered in a handler starts the watch inside the handler's step: the step's
    # blocking after that is its task's, reported once, and the idle loop after it is no stall
    # (on 3.11 the step's end is not seen: the next callback's start ends it).
    reports: list[BlockingCallInfo] = []

    async def handler() -> None:
        scope = monitor_current_task(
            threshold_ms=THRESHOLD_MS, mode="sampling", on_blocking_call=reports.append, report_stalls=True
        )
        with scope:
            time.sleep(0.1)
            await asyncio.sleep(0.3)  # nothing else is ready: the loop idles at once

    async def main() -> None:
        await asyncio.create_task(handler(), name="the-handler")

    asyncio.run(main())
    assert [(r.method_name, r.task_name) for r in reports] == [("time.sleep", "the-handler")]
    assert 100 <= reports[0].duration_ms < 100 + 25
    stalls = [line for line in capfd.readouterr().err.splitlines() if "so far, still running" in line]
    assert len(stalls) == 1 and "handler" in stalls[0], stalls


@needs_sampling
@needs_stack_reads
def test_loopwatchs_own_callbacks_are_not_the_programs_stall() -> None:
    reports: list[BlockingCallInfo] = []

    def slow_callback(info: BlockingCallInfo) -> None:
        reports.append(info)
        time.sleep(0.1)  # the report's callback runs as a loop callback of its own

    async def main() -> None:
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, mode="sampling", on_blocking_call=slow_callback):
            time.sleep(0.06)
            await asyncio.sleep(0.2)

    asyncio.run(main())
    assert [info.method_name for info in reports] == ["time.sleep"]


@needs_sampling
@needs_stack_reads
@pytest.mark.parametrize("loop_kinds", [("asyncio",) * 3, ("uvloop",) * 3, ("asyncio", "uvloop", "asyncio")])
def test_each_loop_in_each_thread_reports_its_own_culprit(loop_kinds: tuple[str, ...]) -> None:
    if "uvloop" in loop_kinds and ("uvloop" not in LOOPS or not C_LOOPS_BY_CONTEXT):
        pytest.skip("the always-on mode sees uvloop from 3.14")
    found: dict[str, list[str]] = {}

    def serve(name: str, seconds: float, loop_kind: str) -> None:
        monitor, reports = sampling_monitor()

        async def main() -> None:
            with monitor:
                for _ in range(3):
                    time.sleep(seconds)
                    await asyncio.sleep(0.01)

        loop = new_loop(loop_kind)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        found[name] = [f"{info.method_name}@{info.thread_id == threading.get_ident()}" for info in reports]

    threads = [
        threading.Thread(target=serve, args=(f"t{i}", 0.05 + 0.01 * i, kind))
        for i, kind in enumerate(loop_kinds)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == {f"t{i}": ["time.sleep@True"] * 3 for i in range(3)}


@needs_sampling
@needs_stack_reads
def test_a_step_cut_short_by_an_exception_the_loop_lets_through_is_not_a_stall(capfd) -> None:
    monitor, reports = sampling_monitor(report_stalls=True)

    def stop_everything() -> None:
        raise SystemExit("out of Handle._run, past its return event")

    async def then_block() -> None:
        time.sleep(0.06)

    with monitor:
        loop = asyncio.new_event_loop()
        try:
            loop.call_soon(stop_everything)
            with pytest.raises(SystemExit):
                loop.run_forever()
            # Outside any loop now: the watchdog must not take this for the step still running.
            time.sleep(0.15)
            loop.run_until_complete(then_block())
        finally:
            loop.close()
    assert [info.method_name for info in reports] == ["time.sleep"]
    stalls = [line for line in capfd.readouterr().err.splitlines() if "so far, still running" in line]
    assert len(stalls) == 1 and "then_block" in stalls[0]


@needs_stack_reads
@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is 3.12+")
def test_with_every_tool_id_taken_it_says_why_once_and_the_program_runs_on(caplog) -> None:
    taken = [tool for tool in (3, 4, 5) if sys.monitoring.get_tool(tool) is None]
    for tool in taken:
        sys.monitoring.use_tool_id(tool, "another tool")
    try:
        from loopwatch import _monitor

        _monitor._unwatched_said = False
        for _ in range(2):
            monitor, reports = sampling_monitor()

            async def main(monitor: EventLoopMonitor = monitor) -> str:
                with monitor:
                    time.sleep(0.05)
                    return "done"

            with caplog.at_level("WARNING", logger="loopwatch"):
                assert asyncio.run(main()) == "done"
            assert reports == []
    finally:
        for tool in taken:
            sys.monitoring.free_tool_id(tool)
    assert caplog.text.count("the always-on mode (mode='sampling') watches nothing here") == 1
    assert "tool id" in caplog.text


@needs_sampling
@needs_stack_reads
def test_uvloop_is_watched_from_3_14_and_said_unseen_before(caplog) -> None:
    uvloop = pytest.importorskip("uvloop")
    from loopwatch import _monitor

    _monitor._unseen_loop_said = False
    monitor, reports = sampling_monitor()

    async def main() -> None:
        # Started inside a task step: that step is timed from here, as on asyncio's own loop.
        with monitor:
            time.sleep(0.06)
            await asyncio.sleep(0)
            time.sleep(0.06)
            await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
    if sys.version_info >= (3, 14):
        assert "sees asyncio's own loops only" not in caplog.text
        # One report per step (never the two merged), each naming the sleep, its line and task.
        assert [(r.kind, r.method_name) for r in reports] == [("call", "time.sleep")] * 2
        lines = [r.lineno for r in reports]
        assert lines[1] == lines[0] + 2, lines
        assert all((r.task_name or "").startswith("Task-") for r in reports)
        assert all(59.5 <= r.duration_ms < 100 for r in reports), [r.duration_ms for r in reports]
    else:
        assert reports == []
        assert (
            "sees asyncio's own loops only before CPython 3.14, and this thread runs a uvloop.Loop"
            in caplog.text
        )


@needs_sampling
@needs_stack_reads
def test_reports_are_recorded_as_in_the_exact_mode(tmp_path: Path) -> None:
    path = tmp_path / "run.lwrec"
    monitor, _ = sampling_monitor(record_to=path)

    async def main() -> None:
        with monitor:
            time.sleep(0.05)
            await asyncio.sleep(0.01)

    asyncio.run(main())
    episodes = read_recording(path).episodes
    assert [(e.method_name, e.kind) for e in episodes] == [("time.sleep", "call")]


HOLDS_THE_GIL = """
import asyncio, sys
import loopwatch

ITEMS = int(sys.argv[1])
finals = []

def crunch():
    return sum(range(ITEMS))  # the call

async def handler():
    await asyncio.sleep(0)
    print("START", file=sys.stderr, flush=True)
    crunch()  # crunch called
    print("END", file=sys.stderr, flush=True)

async def main():
    with loopwatch.EventLoopMonitor(threshold_ms=100, on_blocking_call=finals.append, mode="sampling"):
        await handler()
        await asyncio.sleep(0.01)
    for info in finals:
        print("FINAL", info.method_name, round(info.duration_ms), info.reports_while_running, info.lineno)

asyncio.run(main())
"""


@needs_sampling
@needs_stack_reads
def test_a_c_call_holding_the_gil_is_reported_while_it_runs_and_once_when_it_ends(tmp_path: Path) -> None:
    program = write(tmp_path / "app.py", HOLDS_THE_GIL)
    done = subprocess.run(
        [sys.executable, str(program), str(items_summed_in(0.6))],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    start, end = lines.index("START"), lines.index("END")
    stalls = [i for i, line in enumerate(lines) if "so far, still running" in line]
    assert stalls and all(start < i < end for i in stalls), done.stderr
    assert lines[stalls[0]].endswith(f"at {program}:{line_of(program, 'the call')} in crunch")
    assert lines[stalls[0] + 2].strip() == f"{program}:{line_of(program, 'crunch called')} in handler"
    finals = [line.split() for line in done.stdout.splitlines() if line.startswith("FINAL")]
    assert len(finals) == 1, done.stdout
    _, culprit, duration_ms, reported, lineno = finals[0]
    # A C call that computes is blamed on the line that calls it (see BlockingCallInfo.sampled).
    assert (culprit, int(lineno)) == ("__main__.crunch", line_of(program, "the call"))
    assert int(duration_ms) >= 100 and int(reported) == len(stalls)


BLOCKS_ONCE = """
import asyncio, time

async def main():
    time.sleep(0.08)  # the block
    await asyncio.sleep(0.01)

asyncio.run(main())
"""


@needs_sampling
@needs_stack_reads
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_loopwatch_run_watches_a_program_in_the_always_on_mode(tmp_path: Path, loop_kind: str) -> None:
    if loop_kind != "asyncio" and not C_LOOPS_BY_CONTEXT:
        pytest.skip("before 3.14 the always-on mode sees asyncio's own loops only")
    source = BLOCKS_ONCE
    if loop_kind == "uvloop":
        source = source.replace("asyncio.run(main())", "import uvloop\nuvloop.run(main())")
    program = write(tmp_path / "app.py", source)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopwatch",
            "run",
            "--mode",
            "sampling",
            "--threshold-ms",
            "30",
            str(program),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "time.sleep blocked the event loop for" in done.stderr
    assert f"at {program}:{line_of(program, 'the block')}" in done.stderr
    assert "(always-on mode: the stack as read while it ran)" in done.stderr
    assert "1 blocking episode of 30 ms or more, 1 culprit" in done.stderr


def test_loopwatch_run_refuses_an_unknown_mode_with_the_choices(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loopwatch", "run", "--mode", "fast", "app.py"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "argument --mode: mode must be 'exact' or 'sampling', got 'fast'" in done.stderr


STRESS_SECONDS = float(os.environ.get("LOOPWATCH_STRESS_S", "5"))
"""How long the stress test runs (CI: 5 s; set LOOPWATCH_STRESS_S=300 for minutes)."""


@needs_sampling
@needs_stack_reads
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_steps_whose_stack_changes_as_fast_as_it_can_are_blamed_only_on_their_own_frames(
    loop_kind: str,
) -> None:
    # Every step runs past a 1 ms threshold, so the watchdog reads nearly every one, at half the
    # threshold and at each report, while the stack recurses, yields, unwinds and starts threads.
    # Under uvloop the steps also enter contexts of their own (`Context.run`), one of the loop's
    # own ways of telling its units apart, and the stack outside a unit (the test's, pytest's) is
    # never the unit's.
    if loop_kind != "asyncio" and not C_LOOPS_BY_CONTEXT:
        pytest.skip("before 3.14 the always-on mode sees asyncio's own loops only")
    import contextvars

    from test_stalls import _churn, _known_functions, is_stdlib_function

    known = _known_functions()
    monitor, reports = sampling_monitor(threshold_ms=1.0, report_stalls=True, reports_per_minute=None)

    async def churn(rounds: int) -> None:
        if rounds % 3 == 0:
            contextvars.copy_context().run(_churn, rounds)
        else:
            _churn(rounds)

    async def main() -> None:
        steps = 0
        deadline = time.monotonic() + STRESS_SECONDS
        with monitor:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                while time.perf_counter() - started < 0.003:
                    await churn(steps)
                    steps += 1
                await asyncio.sleep(0)

    loop = new_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    for code in (churn.__code__, main.__code__):
        known[(code.co_filename, code.co_qualname)] = range(code.co_firstlineno, code.co_firstlineno + 20)
    assert len(reports) > 100, len(reports)
    for info in reports:
        for frame in info.stack:
            if frame.is_c_call:
                continue  # named from the call site of the frame below it
            if info.kind == "gc" and frame is info.stack[-1]:
                assert frame.name.startswith("garbage collection"), info.format()
                continue  # a collection over the threshold: no frame of code
            # Named module-qualified: the known function whose file and qualified name it ends with.
            place = next(
                (
                    (filename, function)
                    for filename, function in known
                    if filename == frame.filename and frame.name.endswith(function)
                ),
                None,
            )
            if place is None:
                # What the helper thread's start and join run: the standard library's own.
                function = frame.name.rsplit(".", 1)[-1]
                assert is_stdlib_function(frame.filename, function, frame.lineno), info.format()
            else:
                # A line the reader could not resolve is left out, never guessed.
                assert frame.lineno is None or frame.lineno in known[place], (place, frame.lineno)
