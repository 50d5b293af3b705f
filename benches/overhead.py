"""Overhead of loopwatch next to the floor every profile-hook tool pays (an empty C hook).

    python benches/overhead.py [--rounds 7] [--json]

Runs each workload under each tool in one process, interleaved round by round, and prints the
medians, the ratio to no tool, and loopwatch's overhead_vs_floor = (loopwatch - none) / (floor - none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from loopwatch import EventLoopMonitor, _native

CALLS = 2_000_000
CHUNK = 10_000


def trivial(x):
    return x


async def python_calls():
    for _ in range(CALLS // CHUNK):
        for i in range(CHUNK):
            trivial(i)
        await asyncio.sleep(0)


async def c_calls():
    for _ in range(CALLS // CHUNK):
        for i in range(CHUNK):
            abs(i)
        await asyncio.sleep(0)


async def call_free():
    for _ in range(CALLS // CHUNK):
        x = 0
        for i in range(CHUNK):
            x += i
        await asyncio.sleep(0)


WORKLOADS = {"python_calls": python_calls, "c_calls": c_calls, "call_free": call_free}


class Tool:
    def __init__(self, name, start, stop):
        self.name, self.start, self.stop = name, start, stop


def make_tools():
    monitor = EventLoopMonitor(threshold_ms=10_000)
    return [
        Tool("none", lambda: None, lambda: None),
        Tool("floor", _native._bench_install_empty_hook, _native._bench_uninstall_hook),
        Tool("loopwatch", monitor.activate, monitor.deactivate),
    ]


def time_once(workload, tool):
    async def run():
        tool.start()
        try:
            start = time.perf_counter()
            await workload()
            return time.perf_counter() - start
        finally:
            tool.stop()

    return asyncio.run(run())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tools = make_tools()
    results = {}
    for name, workload in WORKLOADS.items():
        samples = {tool.name: [] for tool in tools}
        for _ in range(args.rounds):
            for tool in tools:  # interleaved: every tool sees the same machine state
                samples[tool.name].append(time_once(workload, tool))
        medians = {tool: statistics.median(times) for tool, times in samples.items()}
        none, floor, ours = medians["none"], medians["floor"], medians["loopwatch"]
        spread = {
            tool: (max(times) - min(times)) / statistics.median(times) for tool, times in samples.items()
        }
        results[name] = {
            "median_s": medians,
            "ratio_to_none": {tool: m / none for tool, m in medians.items()},
            "overhead_vs_floor": (ours - none) / (floor - none) if floor > none else None,
            "spread": spread,
        }
    if args.json:
        json.dump({"python": sys.version.split()[0], "results": results}, sys.stdout, indent=2)
        print()
        return
    print(
        f"CPython {sys.version.split()[0]}, {CALLS:,} iterations, median of {args.rounds} interleaved rounds"
    )
    for name, result in results.items():
        print(f"\n{name}")
        for tool, median in result["median_s"].items():
            ratio = result["ratio_to_none"][tool]
            print(
                f"  {tool:<10} {median * 1000:8.1f} ms  x{ratio:5.2f}  (spread {result['spread'][tool]:.0%})"
            )
        vs_floor = result["overhead_vs_floor"]
        print(f"  overhead_vs_floor = {vs_floor:.2f}" if vs_floor is not None else "  floor ~ none")


if __name__ == "__main__":
    main()
