"""What recording costs, and how fast a recording is read back and reported.

    python benches/recording.py [--episodes 100000] [--rounds 5] [--json results.json]

1. Writing: a loop whose every step is a reported episode (threshold 0.05 ms), run with and
   without ``record_to=``, interleaved, medians: the time each recorded episode adds.
2. Reading: a recording of N real-shaped episodes (copies of episodes the monitor reported,
   each with its stack), read with ``read_recording``; then ``loopwatch report`` on it as text
   and with ``--html``, each timed as a whole command.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from loopwatch import BlockingCallInfo, EventLoopMonitor, read_recording
from loopwatch._recording import open_recorder

THRESHOLD_MS = 0.05
BUSY_S = 0.0001
STEPS = 3000


def busy() -> None:
    end = time.perf_counter() + BUSY_S
    while time.perf_counter() < end:
        pass


async def steps() -> None:
    for _ in range(STEPS):
        busy()
        await asyncio.sleep(0)


def run_steps(record_to: Optional[str], reports: list[BlockingCallInfo]) -> float:
    """Seconds to run the steps with every one reported (and recorded, with `record_to`)."""
    monitor = EventLoopMonitor(
        threshold_ms=THRESHOLD_MS,
        on_blocking_call=reports.append,
        reports_per_minute=None,
        record_to=record_to,
    )

    async def main() -> float:
        with monitor:
            started = time.perf_counter()
            await steps()
            return time.perf_counter() - started

    return asyncio.run(main())


def writing(rounds: int, folder: str) -> dict[str, Any]:
    times: dict[str, list[float]] = {"not recorded": [], "recorded": []}
    counts: list[int] = []
    for round_ in range(rounds):
        # Alternate which goes first, so that neither gets the warmer machine every time.
        for label in list(times) if round_ % 2 == 0 else reversed(list(times)):
            path = os.path.join(folder, f"write-{round_}.lwrec") if label == "recorded" else None
            reports: list[BlockingCallInfo] = []
            times[label].append(run_steps(path, reports))
            counts.append(len(reports))
    base, recorded = (statistics.median(times[k]) for k in times)
    episodes = statistics.median(counts)
    # The write alone, without the noise of the steps around it.
    template = reports_of_one_run()[0]
    recorder = open_recorder(os.path.join(folder, "writes.lwrec"), truncate=True)
    writes = 20_000
    started = time.perf_counter()
    for _ in range(writes):
        recorder.write(template)
    write_us = (time.perf_counter() - started) / writes * 1e6
    return {
        "us_per_write": write_us,
        "us_per_reported_episode_unrecorded": base / episodes * 1e6,
        "episodes_per_run": episodes,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio_recorded_to_not": recorded / base,
        "us_added_per_episode": (recorded - base) / episodes * 1e6,
    }


def reports_of_one_run() -> list[BlockingCallInfo]:
    reports: list[BlockingCallInfo] = []
    run_steps(None, reports)
    return reports


def make_recording(path: str, episodes: int) -> None:
    reports = reports_of_one_run()
    recorder = open_recorder(path, truncate=True)
    started = time.time()
    for i in range(episodes):
        template = reports[i % len(reports)]
        recorder.write(dataclasses.replace(template, timestamp=started + i * 0.001))


def timed_command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def reading(episodes: int, rounds: int, folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "read.lwrec")
    make_recording(path, episodes)
    size = os.path.getsize(path)
    html = os.path.join(folder, "report.html")
    loopwatch = [sys.executable, "-m", "loopwatch", "report", path]
    read_s, text_s, html_s = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        read = read_recording(path)
        read_s.append(time.perf_counter() - started)
        assert len(read.episodes) == episodes and read.problem is None
        text_s.append(timed_command(loopwatch))
        html_s.append(timed_command([*loopwatch, "--html", html]))
    read_median = statistics.median(read_s)
    return {
        "episodes": episodes,
        "file_mib": size / 2**20,
        "bytes_per_episode": size / episodes,
        "read_recording_s": read_median,
        "episodes_per_s": episodes / read_median,
        "report_text_s": statistics.median(text_s),
        "report_html_s": statistics.median(html_s),
        "html_mib": os.path.getsize(html) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {
            "python": platform.python_version(),
            "writing": writing(args.rounds, folder),
            "reading": reading(args.episodes, args.rounds, folder),
        }
    w, r = results["writing"], results["reading"]
    print(f"CPython {results['python']}, {args.rounds} rounds, medians")
    print(
        f"writing: one record {w['us_per_write']:.1f} us (a reported step costs "
        f"{w['us_per_reported_episode_unrecorded']:.0f} us unrecorded); runs of "
        f"{w['episodes_per_run']:.0f} reported steps, recorded/not recorded = "
        f"{w['ratio_recorded_to_not']:.3f} ({w['us_added_per_episode']:.1f} us per episode)"
    )
    print(
        f"reading: {r['episodes']} episodes, {r['file_mib']:.1f} MiB ({r['bytes_per_episode']:.0f} B each); "
        f"read_recording {r['read_recording_s']:.2f} s ({r['episodes_per_s']:,.0f} episodes/s); "
        f"loopwatch report {r['report_text_s']:.2f} s, with --html {r['report_html_s']:.2f} s "
        f"({r['html_mib']:.1f} MiB page)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
