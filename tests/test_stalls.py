"""Stalls reported while they happen: loopwatch's watchdog thread reads the loop thread's Python
stack without the GIL and writes the report to stderr itself, at the threshold and again at 10x and
100x it, even while a C call holds the GIL; the final report says how many times. Real loops, real
threads, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import pytest
from conftest import EXACT_BACKENDS, clean_env, items_summed_in, line_of, monitor, write
from loopwatch import EventLoopMonitor, StallInfo, _native

pytestmark = pytest.mark.skipif(
    _native._stack_reads()[1] is not None, reason=f"stacks cannot be read here: {_native._stack_reads()[1]}"
)

STALL = re.compile(
    r"loopwatch\[(?P<pid>\d+)\]: the event loop of thread '(?P<thread>[^']*)' has been blocked for "
    r"(?P<ms>\d+) ms so far, still running(, at (?P<where>.*))?$"
)


def stall_lines(stderr: str) -> list[re.Match[str]]:
    return [m for m in map(STALL.match, stderr.splitlines()) if m]


def run_program(
    path: Path, backend: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(LOOPWATCH_BACKEND=backend),
    )


HOLDS_THE_GIL = """
import asyncio, sys
import loopwatch

ITEMS = int(sys.argv[1])
REPORT_STALLS = sys.argv[2] == "on"
finals = []

def crunch():
    return sum(range(ITEMS))  # the call

async def handler():
    await asyncio.sleep(0)
    print("START", file=sys.stderr, flush=True)
    crunch()  # crunch called
    print("END", file=sys.stderr, flush=True)

async def main():
    with loopwatch.EventLoopMonitor(threshold_ms=100, on_blocking_call=finals.append,
                                    report_stalls=REPORT_STALLS):
        await handler()
        await asyncio.sleep(0.01)
    for info in finals:
        print("FINAL", info.method_name, round(info.duration_ms), info.reports_while_running)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_a_c_call_holding_the_gil_is_reported_while_it_runs(tmp_path: Path, backend: str) -> None:
    program = write(tmp_path / "app.py", HOLDS_THE_GIL)
    done = run_program(program, backend, str(items_summed_in(0.6)), "on")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    start, end = lines.index("START"), lines.index("END")
    stalls = stall_lines(done.stderr)
    assert stalls, done.stderr
    first = stalls[0]
    # Written while the call still ran: between the program's own lines before and after it.
    assert start < lines.index(first.group(0)) < end
    assert int(first.group("pid")) > 0 and first.group("thread") == "MainThread"
    assert 100 <= int(first.group("ms")) < 1000
    # Its stack is the loop thread's Python stack, innermost first: the call's line, its caller.
    assert first.group("where") == f"{program}:{line_of(program, 'the call')} in crunch"
    stack = lines[lines.index(first.group(0)) + 1 :]
    assert stack[0].strip() == f"{program}:{line_of(program, 'the call')} in crunch"
    assert stack[1].strip() == f"{program}:{line_of(program, 'crunch called')} in handler"
    # The final report counts the reports made while it ran, and it alone is handed on.
    finals = [line.split() for line in done.stdout.splitlines() if line.startswith("FINAL")]
    assert len(finals) == 1, done.stdout
    _, culprit, duration_ms, reported = finals[0]
    assert culprit == "sum" and int(duration_ms) >= 100
    assert int(reported) == len(stalls)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_report_stalls_false_writes_nothing_while_a_step_runs(tmp_path: Path, backend: str) -> None:
    program = write(tmp_path / "app.py", HOLDS_THE_GIL)
    done = run_program(program, backend, str(items_summed_in(0.3)), "off")
    assert done.returncode == 0, done.stderr
    assert stall_lines(done.stderr) == []
    assert [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("FINAL")] == ["0"]


SLEEPS_AND_STEPS = """
import asyncio, sys, time
import loopwatch

async def short_steps():
    for _ in range(40):
        time.sleep(0.01)  # under the threshold: never a stall
        await asyncio.sleep(0)

async def main():
    with loopwatch.EventLoopMonitor(threshold_ms=float(sys.argv[1]), on_blocking_call=lambda info: None):
        await short_steps()
        print("START", file=sys.stderr, flush=True)
        time.sleep(float(sys.argv[2]))  # the long sleep
        print("END", file=sys.stderr, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_a_long_sleep_is_reported_at_ten_times_the_threshold_too_and_short_steps_never(
    tmp_path: Path, backend: str
) -> None:
    program = write(tmp_path / "app.py", SLEEPS_AND_STEPS)
    done = run_program(program, backend, "50", "0.8")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    stalls = stall_lines(done.stderr)
    assert [int(m.group("ms")) // 50 for m in stalls] == [1, 10], done.stderr + done.stdout
    assert all(lines.index("START") < lines.index(m.group(0)) < lines.index("END") for m in stalls)
    assert {m.group("where") for m in stalls} == {f"{program}:{line_of(program, 'the long sleep')} in main"}


FORKS = """
import asyncio, os, sys, time
import loopwatch

async def child_work():
    time.sleep(0.3)  # the child's block

async def main():
    with loopwatch.EventLoopMonitor(threshold_ms=50, on_blocking_call=lambda info: None):
        pid = os.fork()
        if pid == 0:
            asyncio.run(child_work())  # a loop of the child's own
            os._exit(0)
        await asyncio.to_thread(os.waitpid, pid, 0)
        print("CHILD", pid, flush=True)

asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_a_forked_child_reports_its_own_stall_while_it_runs(tmp_path: Path, backend: str) -> None:
    program = write(tmp_path / "app.py", FORKS)
    done = run_program(program, backend)
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[-1])
    stalls = stall_lines(done.stderr)
    children = [m for m in stalls if int(m.group("pid")) == child]
    assert len(children) == 1, done.stderr
    assert (
        children[0].group("where")
        == f"{program}:{line_of(program, 'the child' + chr(39) + 's block')} in child_work"
    )
    # The watchdog ends before each fork: CPython finds no other thread to warn about.
    assert "multi-threaded" not in done.stderr


def interpreter_stack() -> list[tuple[str, str, Optional[int]]]:
    """The calling thread's stack as the interpreter tells it, innermost first, named as the
    reader names frames (qualified names from 3.11)."""
    frame: Any = sys._getframe(1)
    stack = []
    while frame is not None:
        code = frame.f_code
        name = code.co_qualname if sys.version_info >= (3, 11) else code.co_name
        stack.append((code.co_filename, name, frame.f_lineno))
        frame = frame.f_back
    return stack


def test_the_stack_read_without_the_gil_is_the_interpreters() -> None:
    def inner() -> tuple[Any, Any]:
        return _native._read_stack(), interpreter_stack()

    read, expected = inner()
    # The reader starts one frame further in (`inner` calling it) on the same line.
    assert read[1:] == expected[1:]
    assert read[0][:2] == expected[0][:2]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="columns are in code objects from 3.11")
def test_the_reader_gives_the_span_of_each_frames_instruction_and_whether_it_is_a_coroutine() -> None:
    async def coroutine() -> Any:
        return _native._read_stack(details=True), sys._getframe()

    step = coroutine()
    try:
        step.send(None)
    except StopIteration as done:
        read, frame = done.value
    innermost, caller = read[0], read[1]
    assert innermost[1].endswith("coroutine") and innermost[4] is True
    assert caller[4] is False
    # The span is one of the interpreter's own, that of the instruction running: the reader's call.
    line = innermost[2]
    end_line, col, end_col = innermost[3]
    assert (line, end_line, col, end_col) in set(frame.f_code.co_positions())
    source = Path(__file__).read_text().splitlines()[line - 1]
    assert source.encode()[col:end_col].decode() == "_native._read_stack(details=True)"


def _known_functions() -> dict[tuple[str, str], range]:
    """Every function the busy thread below may be running, with its lines."""
    known = {}
    for func in (_busy_thread, _churn, _recurse, _generate, _unwind, _spawn_and_join):
        code = func.__code__
        name = code.co_qualname if sys.version_info >= (3, 11) else code.co_name
        lines = (
            [line for _, _, line in code.co_lines() if line is not None]
            if sys.version_info >= (3, 10)
            else []
        )
        known[(code.co_filename, name)] = range(
            code.co_firstlineno, max(lines, default=code.co_firstlineno + 40) + 1
        )
    return known


def _recurse(depth: int) -> int:
    if depth == 0:
        return sum(range(50))
    return _recurse(depth - 1) + 1


def _generate(n: int) -> Any:
    for i in range(n):
        yield _recurse(i % 7)


def _unwind(depth: int) -> None:
    if depth == 0:
        raise ValueError("unwinding")
    _unwind(depth - 1)


def _spawn_and_join() -> None:
    helper = threading.Thread(target=_recurse, args=(3,))
    helper.start()
    helper.join()


def _churn(rounds: int) -> None:
    """One round of changing the stack as fast as it can: recursion, a generator, an exception
    unwinding, and now and then a thread started and joined."""
    _recurse(rounds % 40)
    sum(_generate(20))
    with contextlib.suppress(ValueError):
        _unwind(rounds % 25)
    if rounds % 50 == 0:
        _spawn_and_join()


def _busy_thread(stop: threading.Event, states: list[int]) -> None:
    states.append(_native._stack_reads()[0])
    rounds = 0
    while not stop.is_set():
        _churn(rounds)
        rounds += 1


def is_stdlib_function(filename: str, function: str, line: Optional[int]) -> bool:
    """Whether `function` is defined in `filename`, a module of the standard library, and `line`
    is one of its lines."""
    if os.path.dirname(filename) != sysconfig.get_paths()["stdlib"]:
        return False
    source = Path(filename).read_text().splitlines()
    name = function.rsplit(".", 1)[-1]
    defined = name == "<module>" or any(text.lstrip().startswith(f"def {name}(") for text in source)
    return defined and (line is None or 1 <= line <= len(source))


def test_stacks_read_from_a_thread_that_changes_its_stack_as_fast_as_it_can_name_only_its_frames() -> None:
    known = _known_functions()
    stop = threading.Event()
    states: list[int] = []
    thread = threading.Thread(target=_busy_thread, args=(stop, states))
    # Both threads want the GIL: hand it over often, so that the reads land all over the run.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    thread.start()
    samples = 0
    dropped = 0
    frames_seen = 0
    deadline = time.monotonic() + 5
    try:
        while not states:
            time.sleep(0.001)
        while time.monotonic() < deadline:
            stack = _native._read_stack(states[0])
            samples += 1
            if stack is None:  # a read that did not check out is dropped, never guessed at
                dropped += 1
                continue
            for filename, function, line in stack:
                frames_seen += 1
                if (filename, function) in known:
                    assert line is None or line in known[(filename, function)], (function, line, stack)
                else:
                    # The thread machinery it runs under, and what that runs (a weakref callback
                    # of threading's as a helper thread ends): real functions of the standard
                    # library, at lines they have.
                    assert is_stdlib_function(filename, function, line), (filename, function, line, stack)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert samples > 200
    assert dropped < samples / 10, (dropped, samples)
    assert frames_seen > samples - dropped


def test_a_thread_that_ended_reads_as_no_stack_not_garbage() -> None:
    states: list[int] = []
    thread = threading.Thread(target=lambda: states.append(_native._stack_reads()[0]))
    thread.start()
    thread.join()
    for _ in range(100):
        stack = _native._read_stack(states[0])
        assert stack is None or all(filename.endswith(".py") for filename, _, _ in stack)


def test_report_stalls_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="report_stalls must be True or False, got str"):
        EventLoopMonitor(report_stalls="yes")  # type: ignore[arg-type]


def test_a_final_report_says_it_was_reported_while_running() -> None:
    from loopwatch import BlockingCallInfo, StackFrame

    frame = StackFrame(name="time.sleep", filename=None, lineno=None, duration_ms=900.0, is_c_call=True)
    info = BlockingCallInfo(
        method_name="time.sleep",
        duration_ms=900.0,
        is_c_call=True,
        stack=(frame,),
        culprit_duration_ms=900.0,
        reports_while_running=2,
    )
    assert (
        "  reported 2 times while it ran (on stderr); this is its full duration" in info.format().splitlines()
    )
    assert (
        "while it ran"
        not in BlockingCallInfo(
            method_name="f", duration_ms=60.0, stack=(frame,), culprit_duration_ms=60.0
        ).format()
    )


def test_traceback_module_agrees_on_lines_of_the_current_frame() -> None:
    # The reader's lines are the interpreter's (PEP 626 line tables), not the definitions'.
    here = traceback.extract_stack(limit=1)[0]
    read = _native._read_stack()
    assert read is not None and read[0] == (here.filename, read[0][1], here.lineno + 1)


HANGS = """
import asyncio, os, sys, time
import loopwatch

async def main():
    with loopwatch.EventLoopMonitor(
        threshold_ms=50, record_to=sys.argv[1], on_blocking_call=lambda info: None
    ):
        await asyncio.sleep(0)
        time.sleep(0.2)  # ends
        await asyncio.sleep(0)
        print("READY", flush=True)
        time.sleep(0.7)  # never ends
        os._exit(0)  # as if killed while blocked: no report of the end

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_a_recording_shows_a_stall_that_never_ended_and_not_one_that_did(
    tmp_path: Path, backend: str
) -> None:
    from loopwatch import read_recording

    program = write(tmp_path / "app.py", HANGS)
    recording = tmp_path / "run.lwrec"
    done = run_program(program, backend, str(recording))
    assert done.returncode == 0, done.stderr
    read = read_recording(recording)
    assert read.problem is None
    ends = f"{program}:{line_of(program, 'ends')} in main"
    hangs = f"{program}:{line_of(program, 'never ends')} in main"
    # Every report made while running is in the file, written by the watchdog itself.
    assert [(s.where, s.number) for s in read.stalls] == [(ends, 1), (hangs, 1), (hangs, 2)]
    assert all(s.thread_name == "MainThread" and s.stack for s in read.stalls)
    # The first stall ended: its report says so and follows it; the second never did.
    assert [(e.method_name, e.reports_while_running) for e in read.episodes] == [("time.sleep", 1)]
    assert [(s.where, s.number) for s in read.unfinished_stalls] == [(hangs, 2)]
    assert read.unfinished_stalls[0].so_far_ms >= 500
    report = subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", str(recording)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    text = report.stdout
    assert "1 stall reported while running with no report of its end" in text
    assert f"\n      {hangs}\n" in text, text


WHOLE_PROGRAM = """
import asyncio, time

async def main():
    await asyncio.sleep(0)
    time.sleep(0.15)  # blocks

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("how", "reported"),
    [
        ([], True),
        (["--no-report-stalls"], False),
    ],
)
def test_loopwatch_run_reports_stalls_while_they_run_unless_told_not_to(
    tmp_path: Path, how: list[str], reported: bool
) -> None:
    program = write(tmp_path / "app.py", WHOLE_PROGRAM)
    done = subprocess.run(
        [sys.executable, "-m", "loopwatch", "run", "--threshold-ms", "50", *how, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    blocks = f"{program}:{line_of(program, 'blocks')} in main"
    assert [m.group("where") for m in stall_lines(done.stderr)] == ([blocks] if reported else [])
    # The report made when the step ended is there either way.
    assert "time.sleep blocked the event loop for" in done.stderr


@pytest.mark.parametrize(("value", "reported"), [("0", False), ("1", True)])
def test_the_environment_turns_stall_reports_off_and_on(
    tmp_path: Path, autostart_env: dict[str, str], value: str, reported: bool
) -> None:
    program = write(tmp_path / "app.py", WHOLE_PROGRAM)
    env = {
        **autostart_env,
        "LOOPWATCH": "1",
        "LOOPWATCH_THRESHOLD_MS": "50",
        "LOOPWATCH_REPORT_STALLS": value,
    }
    done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert bool(stall_lines(done.stderr)) is reported, done.stderr


def test_a_wrong_report_stalls_setting_is_named() -> None:
    from loopwatch._autostart import SettingsError, settings_from_environment

    with pytest.raises(
        SettingsError, match="LOOPWATCH_REPORT_STALLS: must be 1 \\(on\\) or 0 \\(off\\), got 'maybe'"
    ):
        settings_from_environment({"LOOPWATCH": "1", "LOOPWATCH_REPORT_STALLS": "maybe"})


CALLBACKS = """
import asyncio, sys, threading, time
import loopwatch

ITEMS = int(sys.argv[1])
seen = []

def say(line):
    # One write per line: the courier thread prints too.
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

def on_stall(info):
    # Runs on loopwatch's courier thread, while the loop's thread still runs the step.
    seen.append((info.number, round(info.so_far_ms), info.where, threading.current_thread().name))
    say(f"STALL {info.number}")

def crunch(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)  # gives the GIL up: the callback runs meanwhile
    return sum(range(ITEMS))  # holds the GIL: a report made now waits for the callback

async def main():
    finals = []
    with loopwatch.EventLoopMonitor(threshold_ms=50, on_blocking_call=finals.append, on_stall=on_stall):
        await asyncio.sleep(0)
        say("START")
        crunch(0.3)  # the stall
        say("END")
        await asyncio.sleep(0.05)
    for number, so_far, where, thread in seen:
        print("SEEN", number, so_far, where, thread, sep="|")
    print("FINAL", [info.reports_while_running for info in finals])

asyncio.run(main())
"""


@pytest.mark.usefixtures("backend")
def test_a_block_right_after_the_monitor_starts_in_a_step_is_reported_while_it_runs() -> None:
    # The monitor starts inside the step that then blocks (as `with event_loop_monitor_ctx():`
    # around the slow code does): the rest of that step is watched like any other.
    stalls: list[StallInfo] = []
    ctx, reports = monitor(threshold_ms=30, on_stall=stalls.append)

    async def main() -> None:
        with ctx:
            time.sleep(0.2)
            await asyncio.sleep(0)

    asyncio.run(main())
    assert len(reports) == 1 and reports[0].reports_while_running >= 1, reports
    assert stalls and 30 <= stalls[0].so_far_ms < 200, stalls


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_on_stall_gets_each_report_while_the_step_still_runs(tmp_path: Path, backend: str) -> None:
    program = write(tmp_path / "app.py", CALLBACKS)
    done = run_program(program, backend, str(items_summed_in(0.2)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # The first report reached the callback while the loop's thread was still in the step.
    assert lines.index("STALL 1") < lines.index("END"), done.stdout
    seen = [line.split("|")[1:] for line in lines if line.startswith("SEEN")]
    stall = f"{program}:{line_of(program, 'the stall')} in main"
    assert [int(number) for number, *_ in seen] == list(range(1, len(seen) + 1))
    assert {thread for *_, thread in seen} == {"loopwatch-stalls"}
    # Where the step was at each report: crunch's lines, or (by 10x the threshold) past them.
    assert seen[0][2].endswith(" in crunch") and all(
        where.startswith(f"{program}:") for _, _, where, _ in seen
    ), seen
    assert int(seen[0][1]) >= 50
    # Every report of the stall reached the callback, and the final report counts them.
    assert lines[-1] == f"FINAL [{len(seen)}]"
    # Its stack, on stderr, goes through the line of the stall.
    assert f"\n    {stall}\n" in done.stderr


def test_on_stall_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_stall must be callable, got int"):
        EventLoopMonitor(on_stall=3)  # type: ignore[arg-type]


FORK_WITH_COURIER = """
import asyncio, os, sys, time, warnings
import loopwatch

warnings.simplefilter("error")  # a fork that CPython thinks multi-threaded would raise here

async def main():
    with loopwatch.EventLoopMonitor(threshold_ms=50, on_stall=lambda info: None):
        await asyncio.sleep(0)
        time.sleep(0.1)  # the courier and the watchdog are running now
        await asyncio.sleep(0)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("FORKED", flush=True)

asyncio.run(main())
"""


def test_neither_the_watchdog_nor_the_courier_makes_a_fork_multi_threaded(tmp_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    program = write(tmp_path / "app.py", FORK_WITH_COURIER)
    done = run_program(program, EXACT_BACKENDS[-1])
    assert done.returncode == 0, done.stderr
    assert "FORKED" in done.stdout
    assert "multi-threaded" not in done.stderr
