"""A real service under load: what an event-loop monitor costs a uvicorn + Starlette JSON API,
side by side with no monitor, the empty-hook floor, loopwatch's exact and always-on modes, and the
peers asyncio-event-loop-monitor ("aelm") and pyleak.

    python benches/service.py [--duration 8] [--warmup 2] [--rounds 3] [--concurrency 32]
                              [--loop asyncio|uvloop] [--json results.json] [--plot service.png]

Each measurement starts a fresh server (benches/service_app.py) with one monitor active on its loop
thread for the server's whole life, and drives it from a separate load-generator process
(benches/loadgen.py). Scenario `json` calls only the JSON endpoints; `mixed` also sends 1 request in 200
to /block, which holds the loop for 20 ms. Within a round every tool runs once, in an order rotated
from round to round; the table shows the median over rounds and the ratio to no monitor.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Optional

from loadgen import BLOCK_EVERY
from service_app import BLOCK_SECONDS, THRESHOLD_MS

HERE = Path(__file__).resolve().parent
SCENARIOS = ["json", "mixed"]
# tool name -> (module the server imports, distribution a user installs)
TOOLS = {
    "none": (None, None),
    # The empty C profile hook built into loopwatch for benchmarks: the floor of any profile hook.
    "floor": ("loopwatch", "loopwatch"),
    "loopwatch": ("loopwatch", "loopwatch"),
    # The same without reports of running stalls: what the watchdog costs.
    "loopwatch-no-stalls": ("loopwatch", "loopwatch"),
    # The always-on mode (CPython 3.11+): no profile hook.
    "loopwatch-sampling": ("loopwatch", "loopwatch"),
    # The same without measuring waits for the GIL (LOOPWATCH_NO_GIL_WAITS=1): what they cost.
    "loopwatch-sampling-no-gil": ("loopwatch", "loopwatch"),
    "aelm": ("asyncio_event_loop_monitor", "asyncio-event-loop-monitor"),
    "pyleak": ("pyleak", "pyleak"),
}
METRICS = ["rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "errors", "server_cpu", "loadgen_cpu"]
SERVER_START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
        return json.load(response)


@contextlib.contextmanager
def running_server(tool: str, loop: str):
    """A fresh server with `tool` as its monitor, ready to serve; always stopped on exit."""
    port = free_port()
    env = dict(os.environ)
    env.pop("LOOPWATCH_NO_GIL_WAITS", None)
    if tool.endswith("-no-gil"):
        env["LOOPWATCH_NO_GIL_WAITS"] = "1"
        tool = tool.removesuffix("-no-gil")
    command = [sys.executable, str(HERE / "service_app.py"), "--port", str(port), "--monitor", tool]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen([*command, "--loop", loop], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_ready(server, port, log)
            yield server, port
        finally:
            stop(server)


def wait_until_ready(server: subprocess.Popen, port: int, log) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            get_json(port, "/stats", timeout=0.5)
            return
        except OSError:
            time.sleep(0.1)
    exit_code = server.poll()
    why = (
        f"did not answer within {SERVER_START_TIMEOUT_S} s"
        if exit_code is None
        else f"exited with code {exit_code} before it was ready"
    )
    stop(server)
    log.seek(0)
    output = log.read().decode(errors="replace").strip()[-3000:]
    raise SystemExit(f"service.py: the server on port {port} {why}.\nIts output:\n{output or '(none)'}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown runs the lifespan's deactivate
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def measure(tool: str, scenario: str, args: argparse.Namespace) -> dict:
    with running_server(tool, args.loop) as (server, port):
        command = [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "--scenario", scenario]
        command += ["--concurrency", str(args.concurrency), "--server-pid", str(server.pid)]
        command += ["--warmup", str(args.warmup), "--duration", str(args.duration)]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.warmup + args.duration + 60
        )
        if done.returncode != 0:
            raise SystemExit(f"service.py: the load generator failed:\n{done.stderr.strip()[-3000:]}")
        result = json.loads(done.stdout)
        stats = get_json(port, "/stats")
        result["blocking_reports"], result["culprits"] = stats["blocking_reports"], stats["culprits"]
        result["sleep_ms"] = stats.get("sleep_ms", [])
    return result


def available_tools(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    tools, skipped = [], {}
    for tool in wanted:
        module, distribution = TOOLS[tool]
        if tool.startswith("loopwatch-sampling") and sys.version_info < (3, 11):
            skipped[tool] = "the always-on mode needs CPython 3.11+"
            print(f"skipping {tool}: {skipped[tool]}")
        elif module is not None and importlib.util.find_spec(module) is None:
            skipped[tool] = f"{distribution} is not installed (pip install {distribution})"
            print(f"skipping {tool}: {skipped[tool]}")
        else:
            tools.append(tool)
    return tools, skipped


def summarize(runs: list[dict]) -> dict:
    median = {}
    for metric in METRICS:
        values = [run[metric] for run in runs if run.get(metric) is not None]
        median[metric] = statistics.median(values) if values else None
    reports = [run["blocking_reports"] for run in runs]
    return {
        "median": median,
        "blocking_reports": reports,
        "blocks_sent": [run["blocks_sent"] for run in runs],
        "rounds": runs,
    }


def add_ratios(by_tool: dict[str, dict]) -> None:
    none = by_tool.get("none")
    for summary in by_tool.values():
        summary["ratio_to_none"] = {
            metric: summary["median"][metric] / none["median"][metric] if none else None
            for metric in ("rps", "p50_ms", "p99_ms")
        }


def versions() -> dict[str, Optional[str]]:
    found: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in [
        "uvicorn",
        "starlette",
        "httptools",
        "uvloop",
        "loopwatch",
        "asyncio-event-loop-monitor",
        "pyleak",
    ]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def settings_line(settings: dict) -> str:
    return (
        f"CPython {platform.python_version()}, uvicorn + Starlette on the {settings['loop']} loop "
        f"({settings['http']} parser), {settings['concurrency']} connections, "
        f"{settings['duration_s']:g} s measured after {settings['warmup_s']:g} s warm-up, "
        f"median of {settings['rounds']} round{'s' if settings['rounds'] != 1 else ''}"
    )


def scenario_line(settings: dict) -> str:
    return (
        f"monitors at threshold {settings['threshold_ms']:g} ms; mixed = 1 request in "
        f"{settings['block_every']} blocks the loop for {settings['block_ms']:g} ms"
    )


def print_table(results: dict, settings: dict) -> None:
    print(f"\n{settings_line(settings)}")
    print(f"{scenario_line(settings)}\n")
    header = (
        f"{'scenario':<9}{'tool':<20}{'req/s':>8}{'x none':>8}{'p50 ms':>9}{'x none':>8}{'p90 ms':>9}"
        f"{'p99 ms':>9}{'x none':>8}{'max ms':>9}{'errors':>8}{'reports':>9}{'blocks':>8}"
        f"{'server CPU':>12}{'loadgen CPU':>13}"
    )
    print(header)
    print("-" * len(header))

    def ratio(value: Optional[float]) -> str:
        return f"{value:.2f}" if value is not None else "-"

    def share(value: Optional[float]) -> str:
        return f"{value:.0%}" if value is not None else "-"

    for scenario, by_tool in results.items():
        for tool, summary in by_tool.items():
            m, r = summary["median"], summary["ratio_to_none"]
            # No monitor and the empty hook report nothing: their count is None.
            counts = summary["blocking_reports"]
            reports = "-" if None in counts else str(sum(counts))
            print(
                f"{scenario:<9}{tool:<20}{m['rps']:>8.0f}{ratio(r['rps']):>8}{m['p50_ms']:>9.2f}"
                f"{ratio(r['p50_ms']):>8}{m['p90_ms']:>9.2f}{m['p99_ms']:>9.2f}{ratio(r['p99_ms']):>8}"
                f"{m['max_ms']:>9.1f}{m['errors']:>8.0f}{reports:>9}{sum(summary['blocks_sent']):>8}"
                f"{share(m['server_cpu']):>12}{share(m['loadgen_cpu']):>13}"
            )
    print(
        "\nreports: what the server's monitor reported over all rounds (warm-up included); blocks: how many"
        "\n/block requests it got. CPU: share of one core during the measured window (median)."
    )
    print("\nreports by culprit, all rounds:")
    for scenario, by_tool in results.items():
        for tool, summary in by_tool.items():
            if tool != "none":
                culprits: Counter[str] = Counter()
                for run in summary["rounds"]:
                    culprits.update(run["culprits"])
                listed = ", ".join(f"{name} {count}" for name, count in culprits.most_common()) or "none"
                durations = [ms for run in summary["rounds"] for ms in run.get("sleep_ms", [])]
                if durations:
                    listed += f" (time.sleep: median {statistics.median(durations):.1f} ms)"
                print(f"  {scenario:<6} {tool:<19} {listed}")


def plot(results: dict, settings: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return
    scenarios = list(results)
    tools = [tool for tool in TOOLS if any(tool in results[scenario] for scenario in scenarios)]
    colors = {
        "none": "#9e9e9e",
        "floor": "#d0d0d0",
        "loopwatch": "#1f77b4",
        "loopwatch-sampling": "#2ca02c",
        "loopwatch-sampling-no-gil": "#98df8a",
        "aelm": "#ff7f0e",
        "pyleak": "#9467bd",
    }
    panels = [
        ("rps", "requests/s (higher is better)"),
        ("p50_ms", "p50 latency, ms"),
        ("p99_ms", "p99 latency, ms"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 4.6))
    width = 0.8 / len(tools)
    for axis, (metric, label) in zip(axes, panels):
        for index, tool in enumerate(tools):
            xs, heights, ratios = [], [], []
            for position, scenario in enumerate(scenarios):
                summary = results[scenario].get(tool)
                if summary is not None:
                    xs.append(position + (index - (len(tools) - 1) / 2) * width)
                    heights.append(summary["median"][metric])
                    ratios.append(summary["ratio_to_none"].get(metric))
            bars = axis.bar(xs, heights, width, label=tool, color=colors.get(tool))
            labels = [f"x{value:.2f}" if value is not None and tool != "none" else "" for value in ratios]
            axis.bar_label(bars, labels=labels, fontsize=8, padding=2)
        axis.set_title(label, fontsize=10)
        axis.set_xticks(range(len(scenarios)), scenarios)
        axis.margins(y=0.15)
    axes[0].legend(fontsize=8)
    figure.suptitle(
        f"{settings_line(settings)}\n{scenario_line(settings)}; labels: ratio to no monitor",
        fontsize=9,
    )
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the server's loop")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw the results as a PNG (needs matplotlib)")
    args = parser.parse_args()
    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise SystemExit("service.py: --loop uvloop needs uvloop (pip install uvloop)")
    tools, skipped = available_tools(args.tools)
    if not tools:
        raise SystemExit("service.py: no tool left to measure")
    settings = {
        "loop": args.loop,
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "rounds": args.rounds,
        "threshold_ms": THRESHOLD_MS,
        "block_every": BLOCK_EVERY,
        "block_ms": BLOCK_SECONDS * 1000,
    }
    results: dict[str, dict[str, dict]] = {}
    for scenario in args.scenarios:
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for round_index in range(args.rounds):
            # Rotated so that no tool always runs first, or right after another, on a noisy machine.
            shift = round_index % len(tools)
            for tool in tools[shift:] + tools[:shift]:
                run = measure(tool, scenario, args)
                runs[tool].append(run)
                print(
                    f"{scenario:<6} round {round_index + 1}/{args.rounds}  {tool:<10} {run['rps']:7.0f} req/s"
                    f"  p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms"
                    f"  reports {run['blocking_reports']}  errors {run['errors']}",
                    flush=True,
                )
        results[scenario] = {tool: summarize(runs[tool]) for tool in tools}
        add_ratios(results[scenario])
    print_table(results, settings)
    if args.json:
        document = {"settings": settings, "versions": versions(), "skipped": skipped, "results": results}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
        print(f"results written to {args.json}")
    if args.plot:
        plot(results, settings, args.plot)


if __name__ == "__main__":
    main()
