"""Drives examples/ingest_service.py: 100 and then 1,000 concurrent requests at the slow endpoint and
at its fixed twin, printing requests/s, p50 and p99 for each. A few requests of each run carry the
loopwatch token; at the end it prints what loopwatch reported for each endpoint.

    python examples/load.py                  # starts the service itself on a free port
    python examples/load.py --port 8000      # or drives one already running
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

TOKEN = os.environ.get("LOOPWATCH_TOKEN", "example-token")
WATCH_EVERY = 50  # one request in this many carries the token


async def drive(base: str, path: str, requests: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=300) as client:

        async def one(number: int) -> float:
            headers = (
                {"x-loopwatch": TOKEN, "x-request-id": f"{path}#{number}"}
                if number % WATCH_EVERY == 0
                else {}
            )
            started = time.perf_counter()
            response = await client.post(path, json={"id": number}, headers=headers)
            response.raise_for_status()
            return time.perf_counter() - started

        started = time.perf_counter()
        latencies = sorted(await asyncio.gather(*(one(n) for n in range(requests))))
        elapsed = time.perf_counter() - started
    return {
        "rps": requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def wait_for(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("load.py: the service exited before it was ready")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("load.py: the service did not start within 60 s")


async def main(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    print(f"{'endpoint':<15}{'concurrent':>11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for path in ("/ingest/slow", "/ingest/fixed"):
        for requests in (100, 1000):
            result = await drive(base, path, requests)
            print(
                f"{path:<15}{requests:>11,}{result['rps']:>9.0f}{result['p50_ms']:>9.1f}{result['p99_ms']:>9.1f}",
                flush=True,
            )
    async with httpx.AsyncClient(base_url=base) as client:
        reports = (await client.get("/loopwatch/reports")).json()
    print("\nloopwatch's reports, for the requests that carried the token:")
    for path in ("/ingest/slow", "/ingest/fixed"):
        found = Counter(
            (report["culprit"], report["location"]) for report in reports if report["path"] == path
        )
        print(f"  {path}: {sum(found.values())} reports")
        for (culprit, location), count in found.most_common():
            durations = [r["duration_ms"] for r in reports if r["path"] == path and r["culprit"] == culprit]
            print(
                f"    {count:>3} x {culprit:<32} median {statistics.median(durations):6.1f} ms  at {location}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, help="a running service; by default one is started")
    args = parser.parse_args()
    if args.port:
        asyncio.run(main(args.port))
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        service = Path(__file__).with_name("ingest_service.py")
        server = subprocess.Popen([sys.executable, str(service), "--port", str(free)])
        try:
            wait_for(free, server)
            # The clients stand in for other machines: they yield the CPU to the service.
            os.nice(10)
            asyncio.run(main(free))
        finally:
            server.terminate()
            server.wait(timeout=10)
