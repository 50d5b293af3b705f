"""A small HTTP/1.1 load generator for benches/service.py: N keep-alive connections on one asyncio loop
(uvloop if installed), a warm-up, then a fixed measured window; prints one JSON object.

    python benches/loadgen.py --port 8000 [--scenario json|mixed] [--concurrency 32] [--duration 8]

Runs in its own process so that the server's loop thread is the only thing the monitors slow down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from typing import Optional

BLOCK_EVERY = 200  # in the mixed scenario, one request in this many goes to /block


def http_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: loadgen\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def order_body(rng: random.Random, number: int) -> bytes:
    order = {
        "customer": {"id": f"c{number}", "name": f"Customer {number}", "email": f"c{number}@example.org"},
        "coupon": "WELCOME10" if number % 3 == 0 else None,
        "shipping": {"street": "1 Long Street", "city": "Utrecht", "zip": "3511", "country": "NL"},
        "lines": [
            {
                "sku": f"SKU-{rng.randrange(1000):06d}",
                "quantity": rng.randint(1, 5),
                "unit_price_cents": rng.randint(199, 9_999),
                "note": "gift wrap please" if rng.random() < 0.2 else "",
            }
            for _ in range(25)
        ],
    }
    return json.dumps(order).encode()


def json_requests() -> list[bytes]:
    """The JSON endpoints, interleaved: item, feed, order, item, feed, order, ..."""
    rng = random.Random(42)
    requests = []
    for number in range(48):
        # The app maps any id onto the documents it keeps.
        requests.append(http_request("GET", f"/items/{rng.randrange(1000)}"))
        requests.append(http_request("GET", f"/feed/{rng.randrange(1000)}"))
        requests.append(http_request("POST", "/orders", order_body(rng, number)))
    return requests


class Load:
    """The shared request schedule and the results; one loop, so no locks."""

    def __init__(self, scenario: str, warmup: float, duration: float) -> None:
        self.requests = json_requests()
        self.block_request = http_request("GET", "/block")
        self.mixed = scenario == "mixed"
        self.sent = 0
        self.blocks_sent = 0
        self.errors = 0
        self.latencies: list[float] = []
        now = time.perf_counter()
        self.measure_from = now + warmup
        self.measure_until = self.measure_from + duration

    def next_request(self) -> bytes:
        self.sent += 1
        if self.mixed and self.sent % BLOCK_EVERY == 0:
            self.blocks_sent += 1
            return self.block_request
        return self.requests[self.sent % len(self.requests)]


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
            break
    else:
        raise ValueError("response without Content-Length")  # the app always sets it
    await reader.readexactly(length)
    return status


async def connection(load: Load, port: int) -> None:
    writer = None
    try:
        while time.perf_counter() < load.measure_until:
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(load.next_request())
                status = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                load.errors += 1
                if writer is not None:
                    writer.close()
                    writer = None
                await asyncio.sleep(0.01)  # a dead server must not turn this into a busy loop
                continue
            end = time.perf_counter()
            if status != 200:
                load.errors += 1
            elif start >= load.measure_from and end <= load.measure_until:
                load.latencies.append(end - start)
    finally:
        if writer is not None:
            writer.close()


def process_cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """User + system CPU time of another process, where /proc tells it (Linux)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def run(args: argparse.Namespace) -> dict:
    load = Load(args.scenario, args.warmup, args.duration)
    workers = [asyncio.ensure_future(connection(load, args.port)) for _ in range(args.concurrency)]
    await asyncio.sleep(max(0.0, load.measure_from - time.perf_counter()))
    cpu_start, server_cpu_start = time.process_time(), process_cpu_seconds(args.server_pid)
    await asyncio.sleep(max(0.0, load.measure_until - time.perf_counter()))
    cpu_seconds, server_cpu_end = time.process_time() - cpu_start, process_cpu_seconds(args.server_pid)
    # Bounded even if the server stops answering: a stuck request is cut off after a grace period.
    done, pending = await asyncio.wait(workers, timeout=10)
    for worker in pending:
        worker.cancel()
    for worker in done:
        if worker.exception() is not None:
            raise worker.exception()
    latencies_ms = sorted(latency * 1000 for latency in load.latencies)
    if len(latencies_ms) < 2:
        raise SystemExit(f"loadgen: only {len(latencies_ms)} successful requests, {load.errors} errors")
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    server_cpu = None
    if server_cpu_start is not None and server_cpu_end is not None:
        server_cpu = (server_cpu_end - server_cpu_start) / args.duration
    return {
        "scenario": args.scenario,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "requests": len(latencies_ms),
        "rps": len(latencies_ms) / args.duration,
        "p50_ms": cuts[49],
        "p90_ms": cuts[89],
        "p99_ms": cuts[98],
        "max_ms": latencies_ms[-1],
        "errors": load.errors,
        "blocks_sent": load.blocks_sent,
        # Share of one core over the measured window: near 1.0 is saturated, and caps the requests/s.
        "loadgen_cpu": cpu_seconds / args.duration,
        "server_cpu": server_cpu,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scenario", choices=["json", "mixed"], default="json")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--server-pid", type=int, help="also report this process's CPU use")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    coroutine = run(args)
    result = uvloop.run(coroutine) if uvloop is not None else asyncio.run(coroutine)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
