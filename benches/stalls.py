"""How soon a stall is reported while it still runs: a loop step calls one C function that holds
the GIL (``sum(range(n))``, sized on this machine to about `--seconds`), watched with a threshold of
`--threshold-ms`; the watchdog must write its report before the call ends, at the threshold.

    python benches/stalls.py [--runs 20] [--threshold-ms 50] [--seconds 1.0] [--json PATH]

For each run, in a fresh process, on each way of watching (from 3.12 the exact mode through
``sys.monitoring`` and through the legacy hook, and the always-on mode; the legacy hook before):
the lateness of the first report after the threshold, as the watchdog timed it ("blocked for N ms
so far" minus the threshold), and as this script saw it arrive on the pipe (from the program's
"START" line, written just before the call, to the report's line); and whether every report came
before the call ended. Medians and maxima over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

PROGRAM = """
import asyncio, sys
import loopwatch

ITEMS = int(sys.argv[1])
MODE = sys.argv[3]

async def step():
    await asyncio.sleep(0)
    print("START", file=sys.stderr, flush=True)
    sum(range(ITEMS))
    print("END", file=sys.stderr, flush=True)

async def main():
    with loopwatch.EventLoopMonitor(
        threshold_ms=float(sys.argv[2]), on_blocking_call=lambda info: None, mode=MODE
    ):
        await step()

asyncio.run(main())
"""

STALL = re.compile(r"loopwatch\[\d+\]: .* blocked for (\d+) ms so far")


def items_for(seconds: float) -> int:
    n = 2_000_000
    while True:
        started = time.perf_counter()
        sum(range(n))
        took = time.perf_counter() - started
        if took > 0.05:
            return int(n * seconds / took)
        n *= 4


def one_run(items: int, threshold_ms: float, backend: str) -> dict:
    """One program watched `backend`-wise: "monitoring" or "legacy" (the exact mode's), or
    "always-on"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    mode = "sampling" if backend == "always-on" else "exact"
    if mode == "exact":
        env["LOOPWATCH_BACKEND"] = backend
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(items), str(threshold_ms), mode],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    start_seen = None
    first = None
    reports = 0
    ended_before_a_report = False
    for line in process.stderr:
        now = time.perf_counter()
        if line.startswith("START"):
            start_seen = now
        elif line.startswith("END"):
            ended_before_a_report = reports == 0
        else:
            match = STALL.match(line)
            if match:
                reports += 1
                if first is None and start_seen is not None:
                    first = (int(match.group(1)), (now - start_seen) * 1e3)
    process.wait()
    if first is None:
        return {"reported": False}
    return {
        "reported": not ended_before_a_report,
        "reports": reports,
        "watchdog_late_ms": first[0] - threshold_ms,
        "arrival_late_ms": first[1] - threshold_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threshold-ms", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    items = items_for(args.seconds)
    backends = ["monitoring", "legacy"] if sys.version_info >= (3, 12) else ["legacy"]
    if sys.version_info >= (3, 11):
        backends.append("always-on")
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {backend: [] for backend in backends}
    for _ in range(args.runs):
        for backend in backends:  # interleaved
            runs[backend].append(one_run(items, args.threshold_ms, backend))
    print(
        f"CPython {platform.python_version()}, threshold {args.threshold_ms:g} ms, "
        f"a {args.seconds:g} s call holding the GIL, {args.runs} runs each"
    )
    for backend, outcomes in runs.items():
        timed = [o for o in outcomes if o["reported"]]
        summary = {
            "runs": len(outcomes),
            "reported_while_running": len(timed),
            "watchdog_late_ms_median": statistics.median(o["watchdog_late_ms"] for o in timed)
            if timed
            else None,
            "watchdog_late_ms_max": max((o["watchdog_late_ms"] for o in timed), default=None),
            "arrival_late_ms_median": statistics.median(o["arrival_late_ms"] for o in timed)
            if timed
            else None,
            "arrival_late_ms_max": max((o["arrival_late_ms"] for o in timed), default=None),
        }
        results[backend] = summary
        timed_late = f"{summary['watchdog_late_ms_median']} / {summary['watchdog_late_ms_max']}"
        seen_late = f"{summary['arrival_late_ms_median']:.1f} / {summary['arrival_late_ms_max']:.1f}"
        print(
            f"  {backend:<11} reported while running {summary['reported_while_running']}/{summary['runs']};"
            f" late by (median / max) {timed_late} ms as timed, {seen_late} ms as seen on the pipe"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "python": platform.python_version(),
                    "threshold_ms": args.threshold_ms,
                    "seconds": args.seconds,
                    "results": results,
                },
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
