"""What measuring waits for the GIL costs, and what it changes, with threads running pure Python
beside an event loop doing short steps.

    python benches/gil.py [--rounds 5] [--seconds 3] [--hogs 3] [--mode exact|sampling] [--json out.json]

Each round runs, in a fresh process each and in rotating order: no monitor (`none`), loopwatch
measuring waits for the GIL (`gil`), and loopwatch with them off (`LOOPWATCH_NO_GIL_WAITS=1`,
`no-gil`). Each process runs `--hogs` threads of pure Python and a loop whose steps compute
for 2 ms and sleep for half a millisecond, for `--seconds`, and says how many steps the loop ran,
how much CPU loopwatch's watchdog thread used, and what the reports blamed. Medians over rounds;
steps/s as a ratio to `none` in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import asyncio, json, os, sys, threading, time
from collections import Counter

seconds, hogs, tool, mode = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
stop = []

def hog():
    n = 0
    while not stop:
        for i in range(100):
            n += i * i

def watchdog_cpu_ns():
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip().startswith("loopwatch-watch"):
                    with open(f"/proc/self/task/{tid}/schedstat") as s:
                        return int(s.read().split()[0])
        except OSError:
            pass
    return 0

reports = []

async def steps():
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(0)
        until = time.perf_counter() + 0.002
        while time.perf_counter() < until:
            pass
        time.sleep(0.0005)
        n += 1
    return n

async def main():
    if tool == "none":
        return await steps()
    from loopwatch import event_loop_monitor_ctx
    kwargs = {"mode": "sampling"} if mode == "sampling" else {}
    watch = event_loop_monitor_ctx(
        threshold_ms=20, on_blocking_call=reports.append, report_stalls=False, **kwargs
    )
    with watch:
        return await steps()

threads = [threading.Thread(target=hog, name=f"hog-{i}") for i in range(hogs)]
for t in threads:
    t.start()
before = watchdog_cpu_ns()
n = asyncio.run(main())
after = watchdog_cpu_ns()
stop.append(True)
for t in threads:
    t.join()
kinds = Counter(r.kind for r in reports)
print(json.dumps({
    "steps": n,
    "watchdog_cpu_ms": (after - before) / 1e6,
    "reports": dict(kinds),
    "gil_wait_ms": sum(r.gil_wait_ms for r in reports),
}))
"""


def run_one(tool: str, seconds: float, hogs: int, mode: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LOOPWATCH_NO_GIL_WAITS", None)
    if tool == "no-gil":
        env["LOOPWATCH_NO_GIL_WAITS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(seconds), str(hogs), tool, mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--hogs", type=int, default=3)
    parser.add_argument("--mode", choices=("exact", "sampling"), default="exact")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tools = ["none", "gil", "no-gil"]
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        order = tools[r % len(tools) :] + tools[: r % len(tools)]
        rounds.append({tool: run_one(tool, args.seconds, args.hogs, args.mode) for tool in order})
        steps = ", ".join(f"{t} {rounds[-1][t]['steps']} steps" for t in tools)
        print(f"round {r + 1}: {steps}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for tool in tools:
        per_s = [rnd[tool]["steps"] / args.seconds for rnd in rounds]
        ratio = [rnd[tool]["steps"] / rnd["none"]["steps"] for rnd in rounds]
        kinds: dict[str, list[int]] = {}
        for rnd in rounds:
            for kind, count in rnd[tool]["reports"].items():
                kinds.setdefault(kind, []).append(count)
        summary[tool] = {
            "steps_per_s": statistics.median(per_s),
            "ratio_to_none": statistics.median(ratio),
            "watchdog_cpu_ms_per_s": statistics.median(
                rnd[tool]["watchdog_cpu_ms"] / args.seconds for rnd in rounds
            ),
            "reports_per_run": {
                kind: statistics.median(c + [0] * (args.rounds - len(c))) for kind, c in kinds.items()
            },
        }
    print(f"{'tool':8} {'steps/s':>9} {'vs none':>8} {'watchdog CPU ms/s':>18}  reports per run (median)")
    for tool, s in summary.items():
        print(
            f"{tool:8} {s['steps_per_s']:9.0f} {s['ratio_to_none']:8.3f} {s['watchdog_cpu_ms_per_s']:18.2f}  "
            + ", ".join(f"{k}: {v:g}" for k, v in sorted(s["reports_per_run"].items()))
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "python": sys.version.split()[0],
                    "mode": args.mode,
                    "hogs": args.hogs,
                    "seconds": args.seconds,
                    "rounds": rounds,
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
