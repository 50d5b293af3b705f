"""A fault near loopwatch never changes how the program ends: exits, interrupts, loops left open
in threads, shutdown with a monitor still on, and a callback that fails on every report of a
storm. Each a real program in its own process, compared with the same program unmonitored, in the
exact mode and the always-on mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def without_loopwatch_lines(stderr: str) -> str:
    """The program's own stderr: the lines loopwatch printed (a report and its indented stack,
    the summary) taken out."""
    lines, in_report = [], False
    for line in stderr.splitlines():
        if line.startswith("loopwatch"):
            in_report = True
            continue
        if in_report and line.startswith("  "):
            continue
        in_report = False
        lines.append(line)
    return "\n".join(lines)


# The always-on mode exists from 3.11.
MODES = ["exact", "sampling"] if sys.version_info >= (3, 11) else ["exact"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def same_end_as_unmonitored(script: Path, autostart_env: dict[str, str], mode: str, *args: str) -> str:
    """Runs `script` without loopwatch and under LOOPWATCH=1 in `mode`: same exit status, same
    stdout, same stderr but for loopwatch's own lines. Gives the monitored run's stderr."""
    plain = run(script, autostart_env, *args)
    env = {**autostart_env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": "30", "LOOPWATCH_MODE": mode}
    watched = run(script, env, *args)
    assert (watched.returncode, watched.stdout) == (plain.returncode, plain.stdout), watched.stderr
    assert without_loopwatch_lines(watched.stderr) == plain.stderr.rstrip("\n"), watched.stderr
    assert "Exception ignored" not in watched.stderr and "Fatal Python error" not in watched.stderr
    return watched.stderr


ENDINGS = """
import asyncio, sys, time

async def main(how):
    time.sleep(0.1)  # blocks, then the program ends this way
    if how == "exit":
        sys.exit(4)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "error":
        raise RuntimeError("the program's own error")
    print("returned")

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("how", ["exit", "interrupt", "error", "return"])
def test_a_program_ends_as_it_would_unmonitored(
    tmp_path: Path, autostart_env: dict[str, str], how: str, mode: str
) -> None:
    script = write(tmp_path / "ending.py", ENDINGS)
    stderr = same_end_as_unmonitored(script, autostart_env, mode, how)
    # The block was reported all the same, before the program ended.
    assert "time.sleep blocked the event loop for " in stderr


def test_a_loop_left_open_in_a_thread_that_ends(
    tmp_path: Path, autostart_env: dict[str, str], mode: str
) -> None:
    script = write(
        tmp_path / "thread_loop.py",
        """
        import asyncio, threading, time

        async def work():
            time.sleep(0.1)  # blocks in the thread's loop

        def worker():
            loop = asyncio.new_event_loop()
            loop.run_until_complete(work())  # and never closed

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        print("joined")
        """,
    )
    stderr = same_end_as_unmonitored(script, autostart_env, mode)
    assert len(re.findall(r"time\.sleep blocked the event loop for ", stderr)) == 1


def test_shutdown_with_a_monitor_still_active(
    tmp_path: Path, autostart_env: dict[str, str], mode: str
) -> None:
    script = write(
        tmp_path / "left_on.py",
        """
        import asyncio, sys, time
        from loopwatch import EventLoopMonitor

        def report(info):
            print("report", info.method_name)

        monitor = EventLoopMonitor(threshold_ms=30, on_blocking_call=report, mode=sys.argv[1])

        async def main():
            monitor.activate()  # never deactivated: the interpreter shuts down with it on
            time.sleep(0.1)
            await asyncio.sleep(0)

        asyncio.run(main())
        print("done")
        """,
    )
    done = run(script, autostart_env, mode)
    assert (done.returncode, done.stdout) == (0, "report time.sleep\ndone\n"), done.stderr
    # Nothing but loopwatch's own lines (the always-on mode reports the block while it runs).
    assert without_loopwatch_lines(done.stderr) == "", done.stderr


def test_a_callback_that_raises_on_every_report_of_a_storm_keeps_memory_bounded(
    tmp_path: Path, autostart_env: dict[str, str], mode: str
) -> None:
    script = write(
        tmp_path / "storm.py",
        """
        import asyncio, logging, resource, sys, time
        from loopwatch import EventLoopMonitor

        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")

        def broken(info):
            raise ValueError("the callback fails, every time")

        def spin(seconds):
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

        async def storm(episodes):
            for _ in range(episodes):
                spin(0.0003)  # a step over the 0.1 ms threshold
                await asyncio.sleep(0)

        async def main():
            monitor = EventLoopMonitor(
                threshold_ms=0.1, on_blocking_call=broken, reports_per_minute=None, mode=sys.argv[1]
            )
            with monitor:
                await storm(1_000)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                await storm(10_000)
                after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"peak rss grew {after - before} KiB over 10,000 failing reports")

        asyncio.run(main())
        """,
    )
    done = run(script, autostart_env, mode)
    assert done.returncode == 0, done.stderr
    grew = int(re.search(r"grew (-?\d+) KiB", done.stdout).group(1))
    assert grew < 4096, done.stdout  # bounded: nothing of a report or its exception is kept
    # The first failure is logged with its traceback, the rest only counted, once.
    assert done.stderr.count("ValueError: the callback fails, every time") == 1
    assert re.search(r"on_blocking_call raised \d+ more times", done.stderr)
