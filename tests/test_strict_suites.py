"""loopwatch never changes how a test suite runs: a suite whose warnings are errors starts under
``LOOPWATCH=1``, warn mode never fails a test whatever the filters, and under pytest's capture
the whole-program reports still reach the terminal as they happen. Real pytest runs of a sample
suite, in subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import line_of, write

STRICT_INI = """
[pytest]
filterwarnings = error
asyncio_default_fixture_loop_scope = function
"""
SUITE = """
import asyncio, time
import pytest

@pytest.mark.asyncio
async def test_blocks():
    time.sleep(0.1)  # BLOCKS
    await asyncio.sleep(0)

def test_sync():
    assert 1 + 1 == 2
"""


def run_pytest(project: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def strict_project(tmp_path: Path) -> Path:
    write(tmp_path / "pytest.ini", STRICT_INI)
    write(tmp_path / "test_suite.py", SUITE)
    return tmp_path


def test_loopwatch_1_runs_a_suite_whose_warnings_are_errors_and_shows_its_reports(
    tmp_path: Path, autostart_env: dict[str, str]
) -> None:
    project = strict_project(tmp_path)
    env = {**autostart_env, "LOOPWATCH": "1", "LOOPWATCH_THRESHOLD_MS": "30"}
    result = run_pytest(project, "-W", "error", env=env)
    out = result.stdout + result.stderr
    # The suite starts and passes as without loopwatch: no warning about its import at start-up.
    assert result.returncode == 0, out
    assert "2 passed" in result.stdout
    assert "PytestAssertRewriteWarning" not in out
    # The episode is shown on the terminal while the suite runs, not swallowed by pytest's
    # capture of the passing test's stderr: before the closing line of the run.
    passed_at = result.stdout.index("2 passed")
    report_at = result.stdout.index("time.sleep blocked the event loop for ")
    assert report_at < passed_at
    suite = project / "test_suite.py"
    assert f"at {suite}:{line_of(suite, 'BLOCKS')} in test_suite.test_blocks" in result.stdout


def test_warn_mode_never_fails_a_test_whatever_the_warning_filters(
    tmp_path: Path, autostart_env: dict[str, str]
) -> None:
    project = strict_project(tmp_path)
    result = run_pytest(
        project,
        "-W",
        "error",
        "--loopwatch",
        "--loopwatch-mode=warn",
        "--loopwatch-threshold-ms=30",
        env=autostart_env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 1 warning" in result.stdout
    warned = result.stdout[result.stdout.index("warnings summary") :]
    assert "BlockingCallWarning: test blocked the event loop 1 time" in warned
    assert "WARNED test_suite.py::test_blocks: 1 time, longest time.sleep" in result.stdout
    # Fail mode, under the same filters, still fails it.
    failing = run_pytest(
        project, "-W", "error", "--loopwatch", "--loopwatch-threshold-ms=30", env=autostart_env
    )
    assert failing.returncode == 1 and "1 failed, 1 passed" in failing.stdout
