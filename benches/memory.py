"""Peak memory of a program watched by loopwatch: many live tasks, and bursts of reported episodes.

    python benches/memory.py [--tasks 10000] [--episodes 10000] [--json results.json]

Each measurement runs in a fresh interpreter (this file with a hidden --child), so that one peak
cannot hide in another; the child prints its peak RSS (ru_maxrss) and current RSS as JSON.
Beside no monitor, an empty C profile hook shows what any profiler costs CPython itself (it builds a
frame object for every frame it reports), so that what remains is loopwatch's own.
The claim checked: loopwatch's state follows the live stack, not the history, so peak RSS does not
grow with the number of episodes reported (growth from 1x to 5x episodes below 2 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from loopwatch import EventLoopMonitor, _native

# Small enough that every busy step below is a real episode, reported through the whole slow path.
THRESHOLD_MS = 0.05
BUSY_S = 0.0001
# The burst runs on a fixed pool of tasks, so that 5x the episodes means 5x the history, not more tasks.
WORKERS = 100
GROWTH_FACTOR = 5
GROWTH_LIMIT_MIB = 2.0
TOOLS = ("none", "hook", "loopwatch")


# --- the child: one scenario under one tool, in a fresh interpreter -----------------------------


def helper_key(i: int) -> str:
    return f"item-{i % 97}"


def helper_total(values: list[int]) -> int:
    return sum(values)


async def small_task(i: int) -> int:
    # Each task holds a little state across its awaits, so all of it is alive at once.
    record = {"id": i, "key": helper_key(i), "values": [i, i + 1, i + 2]}
    for _ in range(3):
        await asyncio.sleep(0)
        record["values"].append(helper_total(record["values"]) % 1000)
    return len(record["values"])


async def many_tasks(count: int) -> None:
    results = await asyncio.gather(*(small_task(i) for i in range(count)))
    assert len(results) == count


def spin() -> None:
    end = time.perf_counter() + BUSY_S
    while time.perf_counter() < end:
        pass


def middle() -> None:
    spin()


def outer() -> None:
    middle()


async def worker(episodes: int) -> None:
    loop = asyncio.get_running_loop()
    for n in range(episodes):
        # Half the episodes are task steps, half loop callbacks: both kinds of report are built.
        if n % 2:
            loop.call_soon(outer)
        else:
            outer()
        await asyncio.sleep(0)


async def burst(episodes: int) -> None:
    per_worker, rest = divmod(episodes, WORKERS)
    await asyncio.gather(*(worker(per_worker + (w < rest)) for w in range(WORKERS)))


SPIN_NAME = f"{spin.__module__}.{spin.__qualname__}"


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_child(scenario: str, tool: str, count: int) -> dict[str, Any]:
    counts = {"reports": 0, "episodes_reported": 0}

    def count_report(info: Any) -> None:
        # Counts and keeps nothing: any growth measured is loopwatch's, not this callback's.
        counts["reports"] += 1
        if any(frame.name == SPIN_NAME for frame in info.stack):
            counts["episodes_reported"] += 1

    workload: Callable[[], Any] = (lambda: many_tasks(count)) if scenario == "tasks" else lambda: burst(count)
    # Every report must arrive: the runner checks that each episode produced was reported.
    monitor = EventLoopMonitor(
        threshold_ms=THRESHOLD_MS, on_blocking_call=count_report, reports_per_minute=None
    )

    start_tool, stop_tool = {
        "none": (lambda: None, lambda: None),
        "hook": (_native._bench_install_empty_hook, _native._bench_uninstall_hook),
        "loopwatch": (monitor.activate, monitor.deactivate),
    }[tool]

    async def main() -> None:
        start_tool()
        try:
            await workload()
        finally:
            stop_tool()

    gc.collect()
    rss_before = current_rss_kib()
    start = time.perf_counter()
    asyncio.run(main())
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_before_kib": rss_before,
        "rss_after_kib": current_rss_kib(),
        "seconds": seconds,
        "reports": counts["reports"] if tool == "loopwatch" else None,
        "episodes_reported": counts["episodes_reported"] if tool == "loopwatch" else None,
    }


# --- the runner ---------------------------------------------------------------------------------


def measure(scenario: str, tool: str, count: int) -> dict[str, Any]:
    workload = "tasks" if scenario == "tasks" else "burst"
    command = [sys.executable, os.path.abspath(__file__), "--child", workload, tool, str(count)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {scenario}/{tool} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(kib: float) -> float:
    return kib / 1024


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="concurrent tasks in the tasks scenario")
    parser.add_argument("--episodes", type=int, default=10_000, help="blocking episodes in the burst")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", nargs=3, metavar=("WORKLOAD", "TOOL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        workload, tool, count = args.child
        print(json.dumps(run_child(workload, tool, int(count))))
        return
    if args.tasks < 1 or args.episodes < WORKERS:
        parser.error(f"--tasks must be at least 1 and --episodes at least {WORKERS}")

    scenarios = {
        "tasks": args.tasks,
        "episodes": args.episodes,
        "growth": args.episodes * GROWTH_FACTOR,
    }
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for scenario, count in scenarios.items():
        results[scenario] = {"count": count}
        for tool in TOOLS:
            results[scenario][tool] = measure(scenario, tool, count)
            print(f"  ... {scenario} x{count:,} / {tool}", file=sys.stderr, flush=True)

    print(
        f"CPython {platform.python_version()} on {platform.machine()}; threshold {THRESHOLD_MS:g} ms, "
        f"busy steps of {BUSY_S * 1000:g} ms; one fresh interpreter per cell"
    )
    print(
        f"\n  {'scenario':<20}{'none':>10}{'empty hook':>12}{'loopwatch':>12}{'diff':>11}{'vs hook':>9}"
        f"{'kept':>9}{'reports':>9}{'episodes':>10}"
    )
    problems = []
    for scenario, row in results.items():
        none, hook, ours = row["none"], row["hook"], row["loopwatch"]
        diff = mib(ours["peak_rss_kib"] - none["peak_rss_kib"])
        vs_hook = mib(ours["peak_rss_kib"] - hook["peak_rss_kib"])
        kept = mib(ours["rss_after_kib"] - none["rss_after_kib"])
        label = f"{scenario} ({row['count']:,})"
        episodes = "-" if scenario == "tasks" else f"{ours['episodes_reported']:,}"
        print(
            f"  {label:<20}{mib(none['peak_rss_kib']):>6.1f} MiB{mib(hook['peak_rss_kib']):>8.1f} MiB"
            f"{mib(ours['peak_rss_kib']):>8.1f} MiB{diff:>+7.2f} MiB{vs_hook:>+9.2f}{kept:>+9.2f}"
            f"{ours['reports']:>9,}{episodes:>10}"
        )
        row.update(diff_mib=diff, vs_hook_mib=vs_hook, kept_mib=kept)
        if scenario != "tasks" and ours["episodes_reported"] != row["count"]:
            problems.append(
                f"{scenario}: {ours['episodes_reported']:,} episodes reported for {row['count']:,} produced"
            )
    print(
        "\n  peak RSS (ru_maxrss); diff = loopwatch - none; vs hook = loopwatch - empty hook (MiB);\n"
        "  kept = current RSS after deactivate(), loopwatch - none (MiB);\n"
        "  reports = all reports; episodes = reports of the burst's busy steps"
    )

    def growth(tool: str) -> float:
        return mib(results["growth"][tool]["peak_rss_kib"] - results["episodes"][tool]["peak_rss_kib"])

    growth_ours, growth_none = growth("loopwatch"), growth("none")
    bounded = growth_ours - growth_none < GROWTH_LIMIT_MIB
    extra_episodes = results["growth"]["count"] - results["episodes"]["count"]
    per_episode = (growth_ours - growth_none) * 1024 * 1024 / extra_episodes
    print(
        f"\n{'bounded' if bounded else 'NOT BOUNDED'}: from 1x to {GROWTH_FACTOR}x episodes peak RSS grows "
        f"{growth_ours:+.2f} MiB with loopwatch, {growth_none:+.2f} MiB without "
        f"(limit {GROWTH_LIMIT_MIB:g} MiB; {per_episode:+.1f} bytes per extra episode)"
    )
    print(f"runtime {time.perf_counter() - started:.1f} s")

    if args.json:
        document = {
            "python": platform.python_version(),
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count()},
            "threshold_ms": THRESHOLD_MS,
            "busy_ms": BUSY_S * 1000,
            "workers": WORKERS,
            "results": results,
            "growth_mib": {"loopwatch": growth_ours, "none": growth_none},
            "growth_bytes_per_episode": per_episode,
            "bounded": bounded,
            "growth_limit_mib": GROWTH_LIMIT_MIB,
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
    # A burst whose count is off measures the wrong thing: say so after the table, and fail.
    if problems:
        raise SystemExit("report count mismatch: " + "; ".join(problems))
    if not bounded:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
