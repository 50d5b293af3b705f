"""Activation and deactivation: mid-coroutine starts, threads, nesting, decorators, and restoring
whatever profiler was there before."""

from __future__ import annotations

import asyncio
import cProfile
import gc
import inspect
import os
import pstats
import subprocess
import sys
import threading
import time
import types

import pytest
from conftest import BLOCK_S, monitor, names, new_loop, short, watched
from loopwatch import EventLoopMonitor, _monitor, event_loop_monitor_ctx

# Every test here runs on each way the exact mode sees (conftest.EXACT_BACKENDS); what only the
# legacy profile hook does (chaining and restoring profile functions) says so.
pytestmark = pytest.mark.usefixtures("exact_backend")


def legacy_only(exact_backend: str) -> None:
    if exact_backend != "legacy":
        pytest.skip("how the legacy profile hook shares the thread's profile function")


def deep_blocking():
    time.sleep(BLOCK_S)


def test_a_monitor_activated_deep_inside_a_running_coroutine_works(run):
    ctx, reports = monitor()

    async def level3():
        with ctx:
            deep_blocking()
            await asyncio.sleep(0)
            deep_blocking()

    async def level2():
        await level3()

    async def main():
        await asyncio.sleep(0)
        await level2()
        time.sleep(BLOCK_S)  # after deactivation: not reported

    run(main)
    assert len(reports) == 2
    assert [short(n) for n in names(reports[1])] == ["main", "level2", "level3", "deep_blocking", "sleep"]


def test_loops_in_several_threads_are_monitored_independently(loop_kind):
    results = {}

    def thread_main(label, seconds):
        reports = []

        async def main():
            with EventLoopMonitor(threshold_ms=30, on_blocking_call=reports.append):
                await asyncio.sleep(0.05)
                time.sleep(seconds)
                await asyncio.sleep(0.05)

        loop = new_loop(loop_kind)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        results[label] = (threading.get_ident(), reports, sys.getprofile())

    threads = [
        threading.Thread(target=thread_main, args=(label, s)) for label, s in (("a", 0.08), ("b", 0.16))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for label, expected_ms in (("a", 80), ("b", 160)):
        ident, reports, profile_after = results[label]
        assert len(reports) == 1, label
        assert reports[0].thread_id == ident
        assert expected_ms <= reports[0].duration_ms < expected_ms + 60
        assert profile_after is None


def test_deactivation_restores_a_python_profile_function(exact_backend):
    seen = []

    def profiler(frame, event, arg):
        seen.append(event)

    sys.setprofile(profiler)
    try:
        with EventLoopMonitor(threshold_ms=30):
            # sys.monitoring leaves the thread's profile function where it is.
            assert (sys.getprofile() is profiler) == (exact_backend == "monitoring")
        assert sys.getprofile() is profiler
        seen.clear()
        len([])
        assert "c_call" in seen
    finally:
        sys.setprofile(None)


PAUSED_AND_RESTORED = """
import logging, sys
from loopwatch import EventLoopMonitor

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("loopwatch").addHandler(Keep())

seen = []
def profiler(frame, event, arg):
    seen.append(event)

sys.setprofile(profiler)
with EventLoopMonitor(threshold_ms=30):
    seen.clear()
    len([])
    paused = "c_call" not in seen
restored = sys.getprofile() is profiler
seen.clear()
len([])
print(paused, restored, "c_call" in seen, any("gets no events" in w for w in warnings))
"""


def test_where_the_thread_state_cannot_be_read_a_profile_function_is_paused_then_restored(exact_backend):
    # The fallback for a build whose thread-state layout does not match the headers loopwatch
    # knows (a new CPython): the function set before is paused, said so, and put back.
    legacy_only(exact_backend)
    env = {**os.environ, "LOOPWATCH_PORTABLE_THREAD_STATE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PAUSED_AND_RESTORED], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "True"], done.stdout


def profiled_after_monitoring():
    return 1


def test_cprofile_keeps_profiling_after_loopwatch_is_done():
    profile = cProfile.Profile()
    profile.enable()
    try:
        with EventLoopMonitor(threshold_ms=30):
            pass
        profiled_after_monitoring()
    finally:
        profile.disable()
    stats = pstats.Stats(profile)
    assert any(func[2] == "profiled_after_monitoring" for func in stats.stats)


def test_save_and_restore_of_sys_getprofile_inside_monitored_code_keeps_monitoring(run, exact_backend):
    legacy_only(exact_backend)
    ctx, reports = monitor()

    async def main():
        with ctx:
            saved = sys.getprofile()
            sys.setprofile(None)
            time.sleep(BLOCK_S)  # unmonitored: nothing is reported for it
            sys.setprofile(saved)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            time.sleep(BLOCK_S)

    run(main)
    assert [r.method_name for r in reports] == ["time.sleep"]


def profiled_while_monitored():
    return 2


def test_a_profile_function_set_before_loopwatch_keeps_getting_its_events(run):
    seen = []

    def profiler(frame, event, arg):
        if frame.f_code.co_name == "profiled_while_monitored":
            seen.append(event)

    ctx, reports = monitor()

    async def main():
        with ctx:
            profiled_while_monitored()
            time.sleep(BLOCK_S)

    sys.setprofile(profiler)
    try:
        run(main)
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    # The other tool saw the call made while loopwatch watched, and loopwatch saw the block.
    assert seen == ["call", "return"]
    assert [r.method_name for r in reports] == ["time.sleep"]


def test_cprofile_started_before_loopwatch_profiles_what_runs_while_monitored(run):
    ctx, reports = monitor()

    async def main():
        with ctx:
            profiled_while_monitored()
            time.sleep(BLOCK_S)

    profile = cProfile.Profile()
    profile.enable()
    try:
        run(main)
    finally:
        profile.disable()
    stats = pstats.Stats(profile)
    assert any(func[2] == "profiled_while_monitored" for func in stats.stats)
    assert [r.method_name for r in reports] == ["time.sleep"]


def test_a_profile_function_set_inside_monitored_code_is_said_and_the_thread_taken_back(
    run, caplog, exact_backend
):
    legacy_only(exact_backend)
    seen = []

    def profiler(frame, event, arg):
        seen.append(event)

    outer, outer_reports = monitor()
    inner, inner_reports = monitor()

    async def main():
        with outer:
            sys.setprofile(profiler)  # the program's own profiler takes the thread: on every version
            profiled_while_monitored()
            sys.setprofile(None)
            with inner:  # the next activation takes it back
                await asyncio.sleep(0)
                time.sleep(BLOCK_S)

    with caplog.at_level("WARNING", logger="loopwatch"):
        run(main)
    assert "call" in seen  # the program's profiler worked
    assert "took the place of loopwatch's hook" in caplog.text
    assert [r.method_name for r in inner_reports] == ["time.sleep"]
    assert [r.method_name for r in outer_reports] == ["time.sleep"]


def test_nested_contexts_apply_the_inner_settings_inside_and_the_outer_after(run):
    outer, outer_reports = monitor(threshold_ms=150)
    inner, inner_reports = monitor(threshold_ms=30)

    async def main():
        with outer:
            with inner:
                time.sleep(0.06)
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            time.sleep(0.06)  # under the outer threshold
            await asyncio.sleep(0)
            time.sleep(0.2)

    run(main)
    assert [round(r.duration_ms, -1) >= 60 for r in inner_reports] == [True]
    assert [r.threshold_ms for r in inner_reports] == [30]
    assert len(outer_reports) == 1 and outer_reports[0].duration_ms >= 200


def test_an_outer_monitor_keeps_getting_what_crosses_its_threshold_while_an_inner_one_is_on(run):
    outer, outer_reports = monitor(threshold_ms=30)
    inner, inner_reports = monitor(threshold_ms=150)
    logged_inner, logged_reports = monitor(threshold_ms=30)

    async def main():
        with outer:
            with inner:
                time.sleep(BLOCK_S)  # under the inner threshold, over the outer one
                await asyncio.sleep(0)
            with logged_inner:
                time.sleep(BLOCK_S)  # over both: each monitor reports it to its own callback
                await asyncio.sleep(0)

    run(main)
    assert inner_reports == []
    assert [r.threshold_ms for r in outer_reports] == [30, 30]
    assert [r.method_name for r in logged_reports] == ["time.sleep"]


def test_nested_monitors_with_one_callback_report_an_episode_once(run):
    reports = []
    ctx = event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=reports.append)

    async def main():
        with ctx, ctx:
            time.sleep(BLOCK_S)
            await asyncio.sleep(0)

    run(main)
    assert len(reports) == 1


def test_decorating_a_coroutine_function_warns_of_nothing():
    # asyncio.iscoroutinefunction is deprecated from 3.14 (removed in 3.16): a strict suite would
    # fail at import of the code it decorates.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        @event_loop_monitor_ctx(threshold_ms=30)
        async def handler():
            return None

    assert inspect.iscoroutinefunction(handler)


def test_the_decorator_covers_the_whole_coroutine(run):
    reports = []

    @event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=reports.append)
    async def handler():
        await asyncio.sleep(0.01)
        time.sleep(BLOCK_S)
        await asyncio.sleep(0.01)
        time.sleep(BLOCK_S)
        return "done"

    assert run(handler) == "done"
    assert len(reports) == 2


def test_the_decorator_on_a_sync_function_and_async_with(run):
    reports = []
    ctx = event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=reports.append)

    @ctx
    def start():
        return run(main)

    async def main():
        async with ctx:
            time.sleep(BLOCK_S)
        await asyncio.sleep(0)
        time.sleep(BLOCK_S)

    start()
    assert len(reports) == 2


def test_enabled_false_monitors_nothing(run):
    reports = []

    async def main():
        with event_loop_monitor_ctx(enabled=False, threshold_ms=30, on_blocking_call=reports.append):
            time.sleep(BLOCK_S)

    run(main)
    assert reports == []


def test_activate_and_deactivate_by_hand():
    monitor_ = EventLoopMonitor(threshold_ms=30)
    assert not monitor_.is_active
    monitor_.activate()
    monitor_.activate()
    assert monitor_.is_active
    monitor_.deactivate()
    assert not monitor_.is_active
    monitor_.deactivate()
    assert sys.getprofile() is None


def test_is_active_is_per_thread():
    monitor_ = EventLoopMonitor(threshold_ms=30)
    seen = []
    with monitor_:
        thread = threading.Thread(target=lambda: seen.append(monitor_.is_active))
        thread.start()
        thread.join()
        assert monitor_.is_active
    assert seen == [False]


def test_a_thread_that_ends_while_monitored_does_no_harm():
    def forgetful():
        EventLoopMonitor(threshold_ms=30).activate()

    thread = threading.Thread(target=forgetful)
    thread.start()
    thread.join()
    assert sys.getprofile() is None
    # Under sys.monitoring the ended thread's share of the tool id is given back at the next
    # activation on any thread (conftest checks that no test leaves the tool id taken).
    with EventLoopMonitor(threshold_ms=30):
        pass


needs_monitoring = pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is 3.12+")


@needs_monitoring
def test_sys_setprofile_inside_monitored_code_changes_nothing_under_sys_monitoring(run, exact_backend):
    if exact_backend != "monitoring":
        pytest.skip("the legacy hook is the profile function")
    ctx, reports = monitor()

    async def main():
        with ctx:
            sys.setprofile(None)  # another tool's business: loopwatch still watches
            time.sleep(BLOCK_S)
            await asyncio.sleep(0)

    run(main)
    assert [r.method_name for r in reports] == ["time.sleep"]


@needs_monitoring
def test_sys_monitoring_is_the_default_from_3_12_and_legacy_can_be_forced(monkeypatch):
    monkeypatch.delenv("LOOPWATCH_BACKEND")
    with EventLoopMonitor(threshold_ms=30):
        assert watched() == "monitoring"
        assert sys.getprofile() is None
        assert "loopwatch" in [sys.monitoring.get_tool(tool) for tool in range(6)]
    monkeypatch.setenv("LOOPWATCH_BACKEND", "legacy")
    with EventLoopMonitor(threshold_ms=30):
        assert watched() == "legacy"
        assert sys.getprofile() is not None


def test_an_unknown_backend_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv("LOOPWATCH_BACKEND", "magic")
    with pytest.raises(
        ValueError, match="LOOPWATCH_BACKEND must be 'legacy', 'monitoring' or 'auto', got 'magic'"
    ):
        EventLoopMonitor(threshold_ms=30).activate()
    assert watched() is None


@needs_monitoring
def test_with_every_tool_id_taken_the_legacy_hook_watches_and_says_so_once(run, monkeypatch, caplog):
    monkeypatch.setenv("LOOPWATCH_BACKEND", "auto")
    taken = [tool for tool in (3, 4, 5) if sys.monitoring.get_tool(tool) is None]
    for tool in taken:
        sys.monitoring.use_tool_id(tool, "another tool")
    monkeypatch.setattr(_monitor, "_fallback_said", False)
    try:
        for _ in range(2):
            ctx, reports = monitor()

            async def main(ctx=ctx):
                with ctx:
                    assert watched() == "legacy"
                    time.sleep(BLOCK_S)
                    await asyncio.sleep(0)

            with caplog.at_level("WARNING", logger="loopwatch"):
                run(main)
            assert [r.method_name for r in reports] == ["time.sleep"]
    finally:
        for tool in taken:
            sys.monitoring.free_tool_id(tool)
    assert caplog.text.count("not sys.monitoring: every sys.monitoring tool id it may use") == 1


@needs_monitoring
def test_other_sys_monitoring_tools_keep_their_events_while_loopwatch_watches(run, exact_backend):
    events = sys.monitoring.events
    seen = []

    def on_start(code, offset):
        if code.co_name == "profiled_while_monitored":
            seen.append("start")

    ctx, reports = monitor()

    async def main():
        with ctx:
            profiled_while_monitored()
            time.sleep(BLOCK_S)
            await asyncio.sleep(0)

    tool = sys.monitoring.DEBUGGER_ID
    sys.monitoring.use_tool_id(tool, "a debugger")
    try:
        sys.monitoring.register_callback(tool, events.PY_START, on_start)
        sys.monitoring.set_events(tool, events.PY_START)
        run(main)
    finally:
        sys.monitoring.set_events(tool, 0)
        sys.monitoring.register_callback(tool, events.PY_START, None)
        sys.monitoring.free_tool_id(tool)
    assert seen == ["start"]
    assert [r.method_name for r in reports] == ["time.sleep"]


def test_a_pending_exception_passes_through_untouched(run):
    ctx, reports = monitor()

    class Boom(Exception):
        pass

    def raise_after_blocking():
        try:
            raise Boom("original")
        finally:
            time.sleep(BLOCK_S)

    async def main():
        with ctx:
            with pytest.raises(Boom, match="original"):
                raise_after_blocking()
            try:
                raise KeyError("kept")
            except KeyError as error:
                time.sleep(BLOCK_S)
                assert sys.exc_info()[1] is error

    run(main)
    # Both blocks are in one step: one episode, a report for each of its two culprits.
    assert len(reports) == 2 and len({info.episode_id for info in reports}) == 1


def test_deep_recursion_is_tracked_without_trouble(run):
    ctx, reports = monitor()

    def recurse(n):
        if n == 0:
            time.sleep(BLOCK_S)
            return 0
        return recurse(n - 1) + 1

    async def main():
        with ctx:
            assert recurse(600) == 600

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)
    try:
        run(main)
    finally:
        sys.setrecursionlimit(old)
    assert len(reports) == 1
    assert len(reports[0].stack) == 603


def test_reports_leave_no_reference_behind_while_monitoring_goes_on(run):
    # A service keeps its monitor active for weeks: each report must release what it used.
    async def main():
        monitor = EventLoopMonitor(threshold_ms=1, on_blocking_call=lambda info: None)
        with monitor:
            for _ in range(60):
                time.sleep(0.003)
                await asyncio.sleep(0)
            # The sink the hook holds: the thread hub's bound `deliver`, one object for the
            # monitor's life, which each delivery references while it runs.
            hub = _monitor._hub()
            sinks = [
                r
                for r in gc.get_referrers(hub)
                if isinstance(r, types.MethodType) and r.__func__ is _monitor._ThreadHub.deliver
            ]
            return [sys.getrefcount(sink) for sink in sinks]

    refcounts = run(main)
    assert len(refcounts) == 1, "the hook's sink was not found"
    assert max(refcounts) < 10, refcounts
