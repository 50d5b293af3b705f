"""Child processes made from inside a monitored coroutine, as real processes: a child never
reports its parent's episode, and reports its own blocks exactly once, with its own pid, whether
the monitor is the program's own (`event_loop_monitor_ctx`, fork only) or the environment's
(`LOOPWATCH=1`, every start method), in the exact mode and the always-on mode."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import line_of, write
from loopwatch import read_recording

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")

# The parent blocks 100 ms, then starts a child from the same step (the parent's episode is in
# flight when the child is made); the child runs a loop of its own and blocks 60 ms there; the
# parent waits for it in a worker thread.
PROGRAM = """
import asyncio, multiprocessing, os, sys, time
from loopwatch import event_loop_monitor_ctx

def report(info):
    print(f"report {os.getpid()} {info.process_id} {info.method_name} {info.lineno}", flush=True)

async def child_work():
    time.sleep(0.06)  # child blocks

def child():
    asyncio.run(child_work())

def start_child(how):
    if how == "os.fork":
        pid = os.fork()
        if pid == 0:
            child()
            os._exit(0)
        return pid, lambda: os.waitpid(pid, 0)
    process = multiprocessing.get_context(how).Process(target=child)
    process.start()
    return process.pid, process.join

async def work(how):
    time.sleep(0.1)  # parent blocks
    pid, wait = start_child(how)
    await asyncio.to_thread(wait)
    print("child", pid, flush=True)

async def main(how, own_monitor, record, mode):
    if own_monitor:
        with event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=report, record_to=record, mode=mode):
            await work(how)
    else:
        await work(how)

if __name__ == "__main__":
    how, own_monitor, record, mode = sys.argv[1], sys.argv[2] == "own", sys.argv[3], sys.argv[4]
    print("parent", os.getpid(), flush=True)
    asyncio.run(main(how, own_monitor, record, mode))
"""


# The always-on mode exists from 3.11.
MODES = ["exact", "sampling"] if sys.version_info >= (3, 11) else ["exact"]


def run_program(
    tmp_path: Path, how: str, monitor: str, mode: str, env: dict[str, str]
) -> tuple[Path, str, str, int, int]:
    script = write(tmp_path / "forking.py", PROGRAM)
    record = tmp_path / "run.lwrec"
    if monitor == "env":
        env = {**env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": "30", "LOOPWATCH_RECORD": str(record)}
        env["LOOPWATCH_MODE"] = mode
    done = subprocess.run(
        [sys.executable, str(script), how, monitor, str(record), mode],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    parent = int(re.search(r"^parent (\d+)$", done.stdout, re.M).group(1))
    child = int(re.search(r"^child (\d+)$", done.stdout, re.M).group(1))
    return script, done.stdout, done.stderr, parent, child


def check_recording(record: Path, script: Path, parent: int, child: int) -> None:
    episodes = read_recording(record).episodes
    assert {e.process_id for e in episodes} == {parent, child}, [e.headline() for e in episodes]
    # The child's own block, once: nothing of the parent's step, before the fork or after.
    [in_child] = [e for e in episodes if e.process_id == child]
    assert (in_child.method_name, in_child.lineno) == ("time.sleep", line_of(script, "child blocks"))
    assert 55 <= in_child.duration_ms < 100
    # The parent's step (its 100 ms and starting the child), once, in the parent: one report, or
    # one per culprit (the sleep, and under forkserver the wait for the server too), of one step.
    # (The always-on mode names the last stack it read in the step.)
    in_parent = [e for e in episodes if e.process_id == parent]
    assert len({e.episode_id for e in in_parent}) == 1, [e.headline() for e in in_parent]
    assert all(e.duration_ms >= 100 for e in in_parent)
    assert all(any(frame.name == "__main__.work" for frame in e.stack) for e in in_parent)


FORK_METHODS = ["os.fork", "fork"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", FORK_METHODS)
def test_a_forked_child_reports_only_its_own_block_to_the_programs_monitor(
    tmp_path: Path, how: str, mode: str, autostart_env: dict[str, str]
) -> None:
    if how == "fork" and "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method here")
    script, stdout, _, parent, child = run_program(tmp_path, how, "own", mode, autostart_env)
    reports = re.findall(r"^report (\d+) (\d+) (\S+) (\d+)$", stdout, re.M)
    # Each process reports its own block once, in its own process, with its own pid.
    assert [r for r in reports if r[0] == str(child)] == [
        (str(child), str(child), "time.sleep", str(line_of(script, "child blocks")))
    ], stdout
    assert {r[:2] for r in reports if r[0] != str(child)} == {(str(parent), str(parent))}, stdout
    check_recording(tmp_path / "run.lwrec", script, parent, child)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["os.fork", "fork", "forkserver", "spawn"])
def test_every_child_reports_only_its_own_block_under_loopwatch_1(
    tmp_path: Path, how: str, mode: str, autostart_env: dict[str, str]
) -> None:
    if how not in ("os.fork", *multiprocessing.get_all_start_methods()):
        pytest.skip(f"no {how} start method here")
    script, _, stderr, parent, child = run_program(tmp_path, how, "env", mode, autostart_env)
    heads = [line for line in stderr.splitlines() if "blocked the event loop" in line]
    [in_child] = [line for line in heads if line.startswith(f"loopwatch[{child}]: ")]
    # (A spawned or forkserver child imports the script as __mp_main__.)
    assert re.search(rf":{line_of(script, 'child blocks')} in __(mp_)?main__\.child_work$", in_child)
    assert [line for line in heads if not line.startswith(f"loopwatch[{child}]: ")] == [
        line for line in heads if line.startswith(f"loopwatch[{parent}]: ")
    ]
    check_recording(tmp_path / "run.lwrec", script, parent, child)


@pytest.mark.parametrize("mode", MODES)
def test_a_child_that_leaves_through_its_parents_step_reports_nothing(tmp_path: Path, mode: str) -> None:
    # The child unwinds the step it was forked in (sys.exit): that step is the parent's.
    script = write(
        tmp_path / "exits.py",
        """
        import asyncio, os, sys, time
        from loopwatch import event_loop_monitor_ctx

        def report(info):
            print(f"report {os.getpid()} {info.method_name} {info.duration_ms:.0f}", flush=True)

        async def main():
            with event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=report, mode=sys.argv[1]):
                time.sleep(0.1)
                loop = asyncio.get_running_loop()
                pid = os.fork()
                if pid == 0:
                    time.sleep(0.01)
                    # From 3.14 the step cannot end cleanly in the child (asyncio finds the loop
                    # "is not the running loop") and the loop would go on: this ends it then.
                    loop.call_soon(os._exit, 0)
                    sys.exit(0)
                os.waitpid(pid, 0)
                await asyncio.sleep(0)

        print("parent", os.getpid(), flush=True)
        asyncio.run(main())
        """,
    )
    done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    parent = int(re.search(r"^parent (\d+)$", done.stdout, re.M).group(1))
    reports = re.findall(r"^report (\d+) (\S+) (\d+)$", done.stdout, re.M)
    # The parent's step, its culprits (the sleep; the wait for the child too, if it was long):
    # nothing from the child.
    assert reports and {pid for pid, _, _ in reports} == {str(parent)}, done.stdout
