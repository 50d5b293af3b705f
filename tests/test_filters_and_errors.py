"""Include/exclude filters, bad arguments, failing callbacks, and the default log report."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import time

import pytest
from conftest import BLOCK_S, monitor, names, short
from loopwatch import BlockingCallInfo, EventLoopMonitor, event_loop_monitor_ctx

# What every way of seeing must answer alike (conftest.BACKENDS), the always-on mode included.
pytestmark = pytest.mark.usefixtures("backend")

HERE = os.path.dirname(os.path.abspath(__file__))


def my_wrapper():
    time.sleep(BLOCK_S)


def test_excluding_a_module_moves_the_culprit_to_its_caller(run):
    ctx, reports = monitor(exclude_paths=["time"])

    async def main():
        with ctx:
            my_wrapper()

    run(main)
    assert reports[0].method_name == f"{__name__}.my_wrapper"
    assert [short(n) for n in names(reports[0])] == ["main", "my_wrapper"]


def test_include_paths_limits_blame_to_the_users_code(run):
    ctx, reports = monitor(include_paths=[HERE])

    async def main():
        with ctx:
            my_wrapper()

    run(main)
    assert reports[0].method_name == f"{__name__}.my_wrapper"


def test_an_episode_with_no_included_frame_is_dropped(run):
    ctx, reports = monitor(include_paths=["nothing_matches_this"])

    async def main():
        with ctx:
            time.sleep(BLOCK_S)

    run(main)
    assert reports == []


def test_a_user_file_under_concurrent_and_typing_directories_is_not_swallowed(run):
    path = os.path.join(HERE, "fixtures", "concurrent", "typing", "user_helpers.py")
    spec = importlib.util.spec_from_file_location("user_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ctx, reports = monitor(exclude_paths=["time"])

    async def main():
        with ctx:
            module.slow_helper(BLOCK_S)

    run(main)
    assert reports[0].method_name == "user_helpers.slow_helper"
    assert reports[0].filename == path


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"threshold_ms": 0}, ValueError, "threshold_ms must be > 0"),
        ({"threshold_ms": -1}, ValueError, "got -1"),
        ({"threshold_ms": math.nan}, ValueError, "threshold_ms"),
        ({"threshold_ms": math.inf}, ValueError, "threshold_ms"),
        ({"threshold_ms": "10"}, TypeError, "number of milliseconds"),
        ({"threshold_ms": True}, TypeError, "number of milliseconds"),
        ({"on_blocking_call": 5}, TypeError, "on_blocking_call must be callable"),
        ({"include_paths": "myapp"}, TypeError, "not a single string"),
        ({"exclude_paths": [1]}, TypeError, "must hold strings"),
        ({"exclude_paths": 3}, TypeError, "list of strings"),
        ({"include_paths": ["site-packages"]}, ValueError, "include_paths: .*neither a module name"),
        ({"exclude_paths": [""]}, ValueError, "exclude_paths: .*empty"),
    ],
)
def test_bad_arguments_fail_when_the_monitor_is_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        EventLoopMonitor(**kwargs)
    with pytest.raises(error, match=message):
        event_loop_monitor_ctx(**kwargs)


def test_a_raising_callback_is_logged_once_and_monitoring_goes_on(run, caplog):
    calls = []

    def broken(info):
        calls.append(info)
        raise RuntimeError("metrics backend down")

    async def main():
        with event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=broken):
            for _ in range(3):
                time.sleep(BLOCK_S)
                await asyncio.sleep(0)
        return "finished"

    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        assert run(main) == "finished"
    assert len(calls) == 3
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1
    assert "metrics backend down" in caplog.text
    assert "raised 2 more times" in caplog.text


def test_without_a_callback_each_episode_is_one_warning(run, caplog):
    async def worker():
        my_wrapper()

    async def main():
        with event_loop_monitor_ctx(threshold_ms=30):
            await asyncio.create_task(worker(), name="importer")

    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        run(main)
    warnings = [r for r in caplog.records if r.name == "loopwatch"]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert "time.sleep blocked the event loop for" in text
    assert "in task 'importer'" in text
    assert f"at {__file__}:{my_wrapper.__code__.co_firstlineno + 1}" in text
    # The user's frames come first, innermost first.
    stack_lines = [line.strip() for line in text.splitlines()[3:]]
    assert "my_wrapper" in stack_lines[0]
    assert isinstance(warnings[0].loopwatch, BlockingCallInfo)


def test_report_text_and_fields(run):
    ctx, reports = monitor()

    async def main():
        with ctx:
            my_wrapper()

    before = time.time()
    run(main)
    info = reports[0]
    assert before <= info.timestamp <= time.time()
    assert info.threshold_ms == 30
    assert info.culprit_duration_ms <= info.duration_ms
    text = str(info)
    assert text.splitlines()[0].startswith("time.sleep blocked the event loop for")
    assert "time.sleep [C]" in text and "<- culprit" in text


def test_the_peers_positional_fields_still_construct():
    info = BlockingCallInfo("myapp.f", 12.5, True)
    assert (info.method_name, info.duration_ms, info.is_c_call) == ("myapp.f", 12.5, True)
