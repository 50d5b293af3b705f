"""Turns the benchmark results (benches/results/*.json) into the markdown tables of the README's
Performance section, so that the README quotes the runs and nothing is copied by hand.

    python benches/tables.py [benches/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOOL_ORDER = ["floor", "loopwatch", "loopwatch-legacy", "cProfile", "pyinstrument", "yappi", "aelm", "pyleak"]
WORKLOAD_ORDER = ["python_calls", "c_calls", "realistic_mix", "call_free", "other_thread"]


def overhead_tables(results_dir: Path) -> list[str]:
    lines = []

    def minor(path: Path) -> list[int]:
        return [int(part) for part in path.stem.removeprefix("overhead-").split(".")]

    for path in sorted(results_dir.glob("overhead-*.json"), key=minor):
        run = json.loads(path.read_text())
        tools = [tool for tool in TOOL_ORDER if tool in run["results"][WORKLOAD_ORDER[0]]]
        lines.append(
            f"**CPython {run['python']}**: time as a multiple of no tool; median of {run['rounds']} rounds"
        )
        lines.append("")
        lines.append("| workload | " + " | ".join(tools) + " | loopwatch vs floor | spread |")
        lines.append("|---|" + "---:|" * (len(tools) + 2))
        for workload in WORKLOAD_ORDER:
            by_tool = run["results"].get(workload)
            if by_tool is None:
                continue
            cells = [f"{by_tool[tool]['ratio_to_none']:.2f}x" for tool in tools]
            vs_floor = by_tool["loopwatch"]["overhead_vs_floor"]
            vs_floor_text = "-" if vs_floor is None else f"{vs_floor:.2f}"
            spread = max(row["spread"] for row in by_tool.values())
            lines.append(f"| {workload} | " + " | ".join(cells) + f" | {vs_floor_text} | {spread:.0%} |")
        lines.append("")
    return lines


def service_table(results_dir: Path) -> list[str]:
    path = results_dir / "service.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    lines = [
        "| scenario | tool | requests/s | x none | p50 ms | p99 ms | reports | /block requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, by_tool in run["results"].items():
        for tool, summary in by_tool.items():
            median, ratio = summary["median"], summary["ratio_to_none"]
            counts = summary["blocking_reports"]
            reports = "-" if None in counts else f"{sum(counts):,}"
            lines.append(
                f"| {scenario} | {tool} | {median['rps']:.0f} | {ratio['rps']:.2f} | {median['p50_ms']:.2f} "
                f"| {median['p99_ms']:.2f} | {reports} | {sum(summary['blocks_sent']):,} |"
            )
    return [*lines, ""]


def memory_table(results_dir: Path) -> list[str]:
    path = results_dir / "memory.json"
    if not path.exists():
        return []
    run = json.loads(path.read_text())
    mib = 1024.0
    lines = [
        "| scenario | no monitor | empty hook | loopwatch | loopwatch - none | reports |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for scenario, row in run["results"].items():
        peaks = [row[tool]["peak_rss_kib"] / mib for tool in ("none", "hook", "loopwatch")]
        lines.append(
            f"| {scenario} ({row['count']:,}) | {peaks[0]:.1f} MiB | {peaks[1]:.1f} MiB | {peaks[2]:.1f} MiB "
            f"| {peaks[2] - peaks[0]:+.2f} MiB | {row['loopwatch']['reports']:,} |"
        )
    return [*lines, ""]


def main() -> None:
    results_dir = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    print("\n".join(overhead_tables(results_dir) + service_table(results_dir) + memory_table(results_dir)))


if __name__ == "__main__":
    main()
