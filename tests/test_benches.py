"""The overhead runner a user starts from a fresh clone: it runs, names every tool it measured,
and states loopwatch's overhead against the empty-hook floor (its numbers are for benches, not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def test_overhead_runner_reports_loopwatch_against_the_floor(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHES / "overhead.py"),
            # Three rounds of enough calls that one descheduled run cannot sink a median.
            "--rounds=3",
            "--calls=100000",
            "--workloads=python_calls,c_calls,realistic_mix,call_free",
            "--tools=floor,loopwatch,cProfile",
            f"--json={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "overhead_vs_floor" not in done.stderr
    for workload in ("python_calls", "c_calls", "realistic_mix", "call_free"):
        assert workload in done.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results["python_calls"]) == {"none", "floor", "loopwatch", "cProfile"}
    for workload in ("python_calls", "c_calls"):
        assert results[workload]["loopwatch"]["overhead_vs_floor"] is not None
        assert results[workload]["floor"]["ratio_to_none"] > 1


def test_overhead_runner_refuses_an_unknown_tool():
    done = subprocess.run(
        [sys.executable, str(BENCHES / "overhead.py"), "--tools=floor,nosuchtool"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown tool(s) nosuchtool" in done.stderr
