"""Other tools that watch the same program: coverage.py measures what it measures, and loopwatch
reports what blocks, on either way of seeing (from 3.12 both may use sys.monitoring)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env, headlines, line_of, write

pytest.importorskip("coverage")

pytestmark = pytest.mark.usefixtures("exact_backend")

APP = """
import asyncio, time
from loopwatch import EventLoopMonitor

def covered_while_watched(n):
    total = 0
    for i in range(n):
        total += i
    return total

def covered_after(n):
    return n * 2

async def main():
    with EventLoopMonitor(threshold_ms=30):
        covered_while_watched(10)
        time.sleep(0.1)  # BLOCKS
        await asyncio.sleep(0)
    covered_after(3)

asyncio.run(main())
"""


@pytest.mark.parametrize("core", ["sysmon", "ctrace"] if sys.version_info >= (3, 12) else ["ctrace"])
def test_coverage_measures_every_line_while_loopwatch_reports_the_block(
    tmp_path: Path, exact_backend: str, core: str
) -> None:
    app = write(tmp_path / "app.py", APP)
    env = clean_env(LOOPWATCH_BACKEND=exact_backend, COVERAGE_CORE=core)
    data = tmp_path / ".coverage"
    ran = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--data-file={data}", str(app)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert [line.split(" blocked")[0] for line in headlines(ran.stderr)] == ["time.sleep"]
    assert f"app.py:{line_of(app, 'BLOCKS')}" in headlines(ran.stderr)[0]
    report = tmp_path / "coverage.json"
    subprocess.run(
        [sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(report)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    measured = json.loads(report.read_text())["files"]["app.py"]
    # Every line of the program ran, those run while loopwatch watched and after it let go alike.
    assert measured["missing_lines"] == []
    assert measured["summary"]["covered_lines"] == measured["summary"]["num_statements"]
