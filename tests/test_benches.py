"""The overhead runner a user starts from a fresh clone: it runs, names every tool it measured,
and states loopwatch's overhead against the empty-hook floor (its numbers are for benches, not tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    for workload in ("python_calls", "c_calls", "realistic_mix", "call_free"):
        assert set(results[workload]) == {"none", "floor", "loopwatch", "cProfile"}
        assert all(len(results[workload][tool]["samples_s"]) == 3 for tool in results[workload])
    # (Whether the floor stood out of the noise in these three short rounds depends on what else
    # the machine ran meanwhile: the arithmetic is pinned below, on known samples.)


def load_overhead_runner():
    spec = importlib.util.spec_from_file_location("loopwatch_benches_overhead", BENCHES / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_overhead_is_stated_against_the_floor_and_not_against_a_floor_within_noise():
    overhead = load_overhead_runner()
    # none 1.0 s, the empty hook 3.0 s, loopwatch 3.2 s: loopwatch costs 1.1 times the floor.
    results = overhead.summarise(
        {"none": [1.0, 1.1, 0.9], "floor": [3.0, 2.9, 3.1], "loopwatch": [3.2, 3.3, 3.1]}
    )
    assert results["loopwatch"]["overhead_vs_floor"] == pytest.approx(1.1)
    assert results["floor"]["ratio_to_none"] == pytest.approx(3.0)
    # A floor within 2% of no tool (call-free code, or a disturbed run) gives no ratio at all.
    flat = overhead.summarise({"none": [1.0], "floor": [1.01], "loopwatch": [1.05]})
    assert flat["loopwatch"]["overhead_vs_floor"] is None


def test_overhead_runner_refuses_an_unknown_tool():
    done = subprocess.run(
        [sys.executable, str(BENCHES / "overhead.py"), "--tools=floor,nosuchtool"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown tool(s) nosuchtool" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="waits for the GIL are measured on Linux only")
def test_the_gil_bench_runs_each_tool_in_its_own_process_and_says_what_they_blamed(tmp_path):
    from loopwatch import _native

    out = tmp_path / "gil.json"
    done = subprocess.run(
        [sys.executable, str(BENCHES / "gil.py"), "--rounds=1", "--seconds=0.5", "--hogs=2", f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"none", "gil", "no-gil"}
    assert summary["none"]["ratio_to_none"] == 1.0
    if _native._gil_waits_measured():
        # Measured, no report blames the loop's code; the watchdog looked (it used some CPU).
        assert set(summary["gil"]["reports_per_run"]) <= {"gil"}, summary["gil"]
        assert summary["gil"]["watchdog_cpu_ms_per_s"] > 0
