"""`loopwatch run` and the LOOPWATCH environment, as a user runs them: real programs in real
subprocesses (scripts, modules, threads, child processes, uvicorn on loopback with a real HTTP
client). Reports reach stderr, the program's stdout and exit code stay its own, and mistakes get
one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
from conftest import (
    LOOPS,
    REPO_PTH,
    clean_env,
    headlines,
    installed_pth,
    line_of,
    write,
)
from loopwatch._recording import read_recording
from loopwatch._run import Program, split_command_line

THRESHOLD = "30"  # ms; every blocking call below sleeps 100 ms
LOOPWATCH_SCRIPT = shutil.which("loopwatch", path=os.path.dirname(sys.executable))


def loopwatch_run(
    *args: str, cwd: Path, env: Optional[dict[str, str]] = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python -m loopwatch run ...`, or with script=True the installed `loopwatch` command."""
    if script:
        assert LOOPWATCH_SCRIPT, "the loopwatch command is not installed next to this python"
    command = [LOOPWATCH_SCRIPT] if script else [sys.executable, "-m", "loopwatch"]
    return subprocess.run(
        [*command, "run", *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
    )


BLOCKING_SCRIPT = """
    import asyncio
    import sys
    import time

    async def handle():
        time.sleep(0.1)  # blocks

    async def main():
        await handle()
        print("result", sys.argv[1:])

    asyncio.run(main())
    sys.exit(3)
"""


def test_a_blocking_call_is_reported_on_stderr_with_its_line_and_the_program_keeps_stdout_and_exit_code(
    tmp_path: Path,
):
    script = write(tmp_path / "service.py", BLOCKING_SCRIPT)
    result = loopwatch_run(
        "--threshold-ms", THRESHOLD, "service.py", "--port", "8000", cwd=tmp_path, script=True
    )
    assert result.returncode == 3
    assert result.stdout == "result ['--port', '8000']\n"
    [headline] = headlines(result.stderr)
    assert headline.startswith("loopwatch: time.sleep blocked the event loop for ")
    assert f"  at {script}:{line_of(script, 'blocks')}" in result.stderr
    assert f"loopwatch: 1 blocking episode of {THRESHOLD} ms or more, 1 culprit:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_program_with_its_own_monitor_is_still_watched_whole(tmp_path: Path):
    # The program watches one code path itself (as examples/quickstart.py does); loopwatch run
    # must still see that path's episode, and those outside it.
    write(
        tmp_path / "own_monitor.py",
        """
        import asyncio, time
        from loopwatch import event_loop_monitor_ctx

        def own(info):
            print("own:", info.method_name)

        async def main():
            with event_loop_monitor_ctx(threshold_ms=30, on_blocking_call=own):
                time.sleep(0.1)
                await asyncio.sleep(0)
            time.sleep(0.1)
            await asyncio.sleep(0)

        asyncio.run(main())
        """,
    )
    result = loopwatch_run("--threshold-ms", THRESHOLD, "own_monitor.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "own: time.sleep\n"
    assert len(headlines(result.stderr)) == 2
    assert f"loopwatch: 2 blocking episodes of {THRESHOLD} ms or more" in result.stderr


def test_module_form_gets_its_arguments_even_those_that_look_like_loopwatch_options(tmp_path: Path):
    module = write(
        tmp_path / "blocking_job.py",
        """
        import asyncio, sys, time

        async def main():
            time.sleep(0.1)  # blocks
            print(sys.argv[1:], sys.path[0], __name__)

        asyncio.run(main())
        """,
    )
    result = loopwatch_run(
        "--threshold-ms", THRESHOLD, "-m", "blocking_job", "--threshold-ms", "5", "--", "-m", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # As under `python -m`: the module's arguments untouched, the current directory first on sys.path.
    assert result.stdout == f"['--threshold-ms', '5', '--', '-m'] {tmp_path} __main__\n"
    [headline] = headlines(result.stderr)
    assert headline.startswith("loopwatch: time.sleep blocked")
    assert f"{module}:{line_of(module, 'blocks')}" in result.stderr


def test_loops_in_another_thread_and_loops_run_again_and_again_are_each_monitored_and_leave_no_hook(
    tmp_path: Path,
):
    script = write(
        tmp_path / "many_loops.py",
        """
        import asyncio, sys, threading, time

        async def in_worker_thread():
            time.sleep(0.1)  # worker thread blocks

        from loopwatch import _native

        async def on_main_thread():
            assert _native._watched() is not None, "no hook while the loop runs"
            time.sleep(0.1)  # main thread blocks

        def worker():
            asyncio.run(in_worker_thread())
            print("worker thread hook after:", sys.getprofile(), _native._watched())

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        asyncio.run(on_main_thread())
        asyncio.run(on_main_thread())
        loop = asyncio.new_event_loop()
        loop.run_until_complete(on_main_thread())
        loop.run_until_complete(on_main_thread())
        loop.close()
        try:
            import uvloop
        except ImportError:
            print("uvloop: absent")
        else:
            uvloop.new_event_loop().run_until_complete(on_main_thread())
            print("uvloop: ran")
        time.sleep(0.1)  # no loop runs here: never reported
        print("main thread hook after:", sys.getprofile(), _native._watched())
        """,
    )
    result = loopwatch_run("--threshold-ms", THRESHOLD, str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "worker thread hook after: None None" in result.stdout
    assert "main thread hook after: None None" in result.stdout
    uvloop_ran = "uvloop: ran" in result.stdout
    where = [line.strip() for line in result.stderr.splitlines() if line.startswith("  at ")]
    worker_line = f"at {script}:{line_of(script, 'worker thread blocks')}"
    main_line = f"at {script}:{line_of(script, 'main thread blocks')}"
    assert where == [worker_line] + [main_line] * (5 if uvloop_ran else 4)
    assert len(headlines(result.stderr)) == len(where)


UVICORN_OPTIONS = ("--lifespan", "off", "--log-level", "warning")


@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_run_as_a_module_reports_the_blocking_endpoint_of_a_real_request(tmp_path: Path, loop: str):
    app = write(
        tmp_path / "app.py",
        """
        import time

        async def app(scope, receive, send):
            assert scope["type"] == "http"
            if scope["path"] == "/block":
                time.sleep(0.1)  # endpoint blocks
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        """,
    )
    with socket.socket() as probe:  # a free port for uvicorn (it cannot report one it picks)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uvicorn = ["-m", "uvicorn", "app:app", "--port", str(port), "--loop", loop, *UVICORN_OPTIONS]
    server = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "run", "--threshold-ms", THRESHOLD, *uvicorn],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/fast", timeout=5) as response:
                    assert response.read() == b"done"
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/block", timeout=5) as response:
            assert response.read() == b"done"
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, stderr
    # The endpoint's block, reported once, named at its line. (The server may block too, for
    # its own reasons: uvicorn imports part of itself on the loop at the first request.)
    where = f"{app}:{line_of(app, 'endpoint blocks')}"
    [headline] = [line for line in headlines(stderr) if where in line]
    assert headline.startswith("loopwatch: time.sleep blocked the event loop for ")
    assert headline.endswith(f" at {where} in app.app")
    assert f"  at {where}" in stderr
    assert re.search(
        rf"^  1x  worst +[\d.]+ ms  time\.sleep  at {re.escape(where)} in app\.app$", stderr, re.M
    )


MODULES_SCRIPT = """
    import asyncio
    import mylib

    async def main():
        mylib.render()

    asyncio.run(main())
"""
MYLIB = """
    import time

    def render():
        time.sleep(0.1)  # mylib blocks
"""


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ((), "time.sleep"),
        (("--exclude", "time"), "mylib.render"),  # the C call may not be blamed: its caller is
        (("--include", "mylib"), "mylib.render"),
        (("--include", "otherlib", "--include", "elsewhere/"), None),  # nothing may be blamed
    ],
)
def test_include_and_exclude_choose_what_may_be_blamed(tmp_path: Path, options: tuple[str, ...], culprit):
    write(tmp_path / "mylib.py", MYLIB)
    write(tmp_path / "main.py", MODULES_SCRIPT)
    result = loopwatch_run("--threshold-ms", THRESHOLD, *options, "main.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    if culprit is None:
        assert headlines(result.stderr) == []
        assert f"nothing blocked an event loop of this process for {THRESHOLD} ms or more" in result.stderr
    else:
        [headline] = headlines(result.stderr)
        assert headline.startswith(f"loopwatch: {culprit} blocked the event loop")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--threshold-ms", "-5", "x.py"),
            "argument --threshold-ms: must be a number of milliseconds > 0, got '-5'",
        ),
        (
            ("--threshold-ms", "soon", "x.py"),
            "argument --threshold-ms: must be a number of milliseconds, got 'soon'",
        ),
        (("--include", "my app", "x.py"), 'argument --include: bad path pattern "my app"'),
        (("--threshold-ms", "10"), "give a script to run, or -m module"),
        (("-m",), "-m needs a module name"),
        (("--frobnicate", "x.py"), "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options_are_a_usage_error_without_traceback(tmp_path: Path, args: tuple[str, ...], message: str):
    result = loopwatch_run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("missing.py",),
            "loopwatch run: can't open file '{cwd}/missing.py': [Errno 2] No such file or directory",
        ),
        (("-m", "no_such_module"), "loopwatch run: No module named no_such_module"),
        (("-m", "email"), "loopwatch run: No module named email.__main__; 'email' is a package"),
    ],
)
def test_a_missing_script_or_module_is_one_line_and_exit_1(
    tmp_path: Path, args: tuple[str, ...], message: str
):
    result = loopwatch_run(*args, cwd=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(message.format(cwd=tmp_path.resolve()))


def test_the_programs_own_exception_is_its_traceback_without_loopwatch_frames(tmp_path: Path):
    script = write(
        tmp_path / "crash.py",
        """
        def load():
            raise RuntimeError("config missing")

        load()
        """,
    )
    result = loopwatch_run(str(script), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith(f'  File "{script}", line 4')
    assert "RuntimeError: config missing" in lines
    assert "loopwatch" not in "\n".join(lines[:-1]) and "runpy" not in result.stderr


def test_sys_exit_with_a_message_behaves_as_under_python(tmp_path: Path):
    write(tmp_path / "bye.py", "import sys\nsys.exit('bad input file')\n")
    result = loopwatch_run("bye.py", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "bad input file"


# The environment form: the .pth file in site-packages starts monitoring at interpreter start-up.


def test_installed_wheel_has_the_pth_at_the_root_of_site_packages():
    path = installed_pth()
    if path is None:
        pytest.skip("loopwatch is installed editable here (maturin develop), which installs no .pth")
    if REPO_PTH.exists():
        assert path.read_text() == REPO_PTH.read_text()
    assert 'os.environ.get("LOOPWATCH"' in path.read_text()


def test_the_pth_imports_nothing_when_loopwatch_is_not_asked_for(autostart_env: dict[str, str]):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; print(sorted({'loopwatch', 'asyncio'} & set(sys.modules)))"],
        env=autostart_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.stdout, result.stderr) == ("[]\n", "")


def test_loopwatch_1_monitors_a_program_started_by_plain_python(
    tmp_path: Path, autostart_env: dict[str, str]
):
    script = write(tmp_path / "service.py", BLOCKING_SCRIPT)
    env = {**autostart_env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": THRESHOLD}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 3
    assert result.stdout == "result []\n"
    [headline] = headlines(result.stderr)
    # A process started by another tool says which one it is.
    assert headline.startswith("loopwatch[") and "]: time.sleep blocked the event loop" in headline
    assert f"{script}:{line_of(script, 'blocks')}" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "LOOPWATCH",
            "maybe",
            "loopwatch: LOOPWATCH: must be 1 (on) or 0 (off), got 'maybe'; not monitoring",
        ),
        (
            "LOOPWATCH_THRESHOLD_MS",
            "fast",
            "loopwatch: LOOPWATCH_THRESHOLD_MS: must be a number of milliseconds, got 'fast'; not monitoring",
        ),
        ("LOOPWATCH_INCLUDE", "myapp,my app", 'loopwatch: LOOPWATCH_INCLUDE: bad path pattern "my app"'),
    ],
)
def test_a_bad_environment_value_is_one_line_and_the_program_runs_unmonitored(
    tmp_path: Path, autostart_env: dict[str, str], variable: str, value: str, message: str
):
    script = write(tmp_path / "service.py", BLOCKING_SCRIPT)
    env = {**autostart_env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": THRESHOLD, variable: value}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout) == (3, "result []\n")
    [line] = result.stderr.splitlines()
    assert line.startswith(message)


def test_child_processes_are_monitored_and_record_into_the_same_file(
    tmp_path: Path, autostart_env: dict[str, str]
):
    script = write(
        tmp_path / "pool.py",
        """
        import asyncio, multiprocessing, os, time

        async def child_work():
            time.sleep(0.1)  # child blocks

        def child():
            asyncio.run(child_work())

        async def parent_work():
            time.sleep(0.1)  # parent blocks

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(target=child)
            process.start()
            process.join()
            print("child pid", process.pid, "exit", process.exitcode)
            asyncio.run(parent_work())
        """,
    )
    recording = tmp_path / "run.lwrec"
    _earlier_recording(tmp_path)
    result = loopwatch_run(
        "--threshold-ms", THRESHOLD, "--record", "run.lwrec", str(script), cwd=tmp_path, env=autostart_env
    )
    assert result.returncode == 0, result.stderr
    child_pid = int(result.stdout.split()[2])
    assert result.stdout.endswith("exit 0\n")
    reports = headlines(result.stderr)
    assert f"loopwatch[{child_pid}]: time.sleep blocked the event loop" in reports[0]
    assert reports[1].startswith("loopwatch: time.sleep blocked the event loop")
    assert f"{script}:{line_of(script, 'child blocks')}" in result.stderr
    assert (
        f"loopwatch: recorded to {recording}; summarize it with: loopwatch report {recording}"
        in result.stderr
    )

    read = read_recording(recording)  # the earlier run's episode is gone: started afresh
    assert read.problem is None
    assert len(read.sessions) == 2 and child_pid in {session.process_id for session in read.sessions}
    assert sorted(episode.lineno for episode in read.episodes) == sorted(
        [line_of(script, "child blocks"), line_of(script, "parent blocks")]
    )


def _earlier_recording(tmp_path: Path) -> bytes:
    """Records one run into tmp_path/run.lwrec and gives back the file's bytes."""
    write(tmp_path / "blocking.py", BLOCKING_SCRIPT)
    result = loopwatch_run("--threshold-ms", THRESHOLD, "--record", "run.lwrec", "blocking.py", cwd=tmp_path)
    assert len(read_recording(tmp_path / "run.lwrec").episodes) == 1, result.stderr
    return (tmp_path / "run.lwrec").read_bytes()


def test_record_refuses_a_file_that_is_not_a_recording_and_leaves_it_alone(tmp_path: Path):
    # `--record app.py app.py`: the user's script must not become a recording.
    script = write(tmp_path / "app.py", BLOCKING_SCRIPT)
    before = script.read_bytes()
    result = loopwatch_run("--threshold-ms", THRESHOLD, "--record", "app.py", "app.py", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")  # the program did not run
    assert result.stderr.splitlines() == [
        f"loopwatch run: cannot record to {script}: it holds something else than a loopwatch "
        "recording: not adding to it"
    ]
    assert script.read_bytes() == before


def test_record_starts_an_earlier_recording_afresh(tmp_path: Path):
    _earlier_recording(tmp_path)
    result = loopwatch_run("--threshold-ms", THRESHOLD, "--record", "run.lwrec", "blocking.py", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    read = read_recording(tmp_path / "run.lwrec")
    assert (len(read.sessions), len(read.episodes), read.problem) == (1, 1, None)


def test_a_module_that_is_not_found_leaves_the_last_recording_as_it_was(tmp_path: Path):
    before = _earlier_recording(tmp_path)
    result = loopwatch_run("--record", "run.lwrec", "-m", "no_such_module_here", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "loopwatch run: No module named no_such_module_here\n"
    assert (tmp_path / "run.lwrec").read_bytes() == before
    # Nor is a new recording left behind for a program that never ran.
    result = loopwatch_run("--record", "new.lwrec", "-m", "no_such_module_here", cwd=tmp_path)
    assert result.returncode == 1
    assert not (tmp_path / "new.lwrec").exists()


def test_loopwatch_record_in_the_environment_refuses_a_file_that_is_not_a_recording(
    tmp_path: Path, autostart_env: dict[str, str]
):
    script = write(tmp_path / "service.py", BLOCKING_SCRIPT)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own notes\n")
    env = {
        **autostart_env,
        "LOOPWATCH": "1",
        "LOOPWATCH_THRESHOLD_MS": THRESHOLD,
        "LOOPWATCH_RECORD": "notes.txt",
    }
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    # The program runs as it would (unmonitored), after one line; the file is untouched.
    assert (result.returncode, result.stdout) == (3, "result []\n")
    [line] = result.stderr.splitlines()
    assert line == (
        f"loopwatch: not monitoring (cannot record to {notes}: it holds something else than a "
        "loopwatch recording: not adding to it); the program goes on"
    )
    assert notes.read_text() == "the user's own notes\n"


@pytest.mark.parametrize(
    ("tokens", "own", "program"),
    [
        (["app.py"], [], Program(argv=("app.py",))),
        (
            ["--threshold-ms", "5", "app.py", "--threshold-ms", "9"],
            ["--threshold-ms", "5"],
            Program(argv=("app.py", "--threshold-ms", "9")),
        ),
        (
            ["--threshold-ms=5", "--include", "x", "-m", "uvicorn", "-m"],
            ["--threshold-ms=5", "--include", "x"],
            Program(True, ("uvicorn", "-m")),
        ),
        (["-muvicorn", "app:app"], [], Program(True, ("uvicorn", "app:app"))),
        (
            ["--record", "run.lwr", "--", "-odd-name.py", "--"],
            ["--record", "run.lwr"],
            Program(argv=("-odd-name.py", "--")),
        ),
        (["--help"], ["--help"], Program()),
        (["--threshold-ms"], ["--threshold-ms"], Program()),
        (["-m"], [], Program(module=True)),
    ],
)
def test_the_command_line_splits_where_the_program_starts(
    tokens: list[str], own: list[str], program: Program
):
    assert split_command_line(tokens) == (own, program)


def test_run_help_shows_both_forms_and_the_environment(tmp_path: Path):
    result = loopwatch_run("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "loopwatch run [options] -m module [args ...]" in result.stdout
    assert "LOOPWATCH=1" in result.stdout
    # Recordings are .lwrec everywhere: in this text as in the README and loopwatch report.
    assert "LOOPWATCH_RECORD=run.lwrec" in result.stdout and ".lwr " not in result.stdout


def test_cprofile_of_a_program_under_loopwatch_1_sees_what_runs_in_the_loop(
    tmp_path: Path, autostart_env: dict[str, str]
):
    # `python -m cProfile` sets its profiler first; loopwatch then watches each loop on top of
    # it. Both must see the coroutine's work (before 3.12 cProfile is a profile function too).
    script = write(tmp_path / "service.py", BLOCKING_SCRIPT)
    env = {**autostart_env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": THRESHOLD}
    stats_file = tmp_path / "profile.out"
    result = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats_file), str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr  # cProfile ends the program's sys.exit(3) itself
    [headline] = headlines(result.stderr)
    assert f"at {script}:{line_of(script, 'blocks')} in __main__.handle" in headline
    import pstats

    profiled = {name for (_, _, name) in pstats.Stats(str(stats_file)).stats}
    assert {"handle", "main"} <= profiled
