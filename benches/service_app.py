"""The service that benches/service.py puts under load: a small Starlette JSON API served by uvicorn,
with one event-loop monitor (or none) active on the loop thread for the whole life of the server.

    python benches/service_app.py --port 8000 --monitor none|floor|loopwatch|...|aelm|pyleak
                                  [--loop asyncio|uvloop]

Endpoints: GET /items/{item_id} and GET /feed/{user_id} decode stored documents, POST /orders decodes
the request body; all three do small helper calls and dict/list work and encode a JSON response.
GET /block holds the loop for 20 ms; GET /stats says how many blocking reports the monitor received,
by culprit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

BLOCK_SECONDS = 0.02
THRESHOLD_MS = 10
ITEM_COUNT = 64
USER_COUNT = 16

# Stored documents are kept as encoded JSON, as a cache or a database would hand them over, so every
# request pays for decoding them.
_rng = random.Random(1234)
TAGS = ["outdoor", "kitchen", "garden", "tools", "kids", "sport", "office", "sale", "new", "eco"]


def _make_item(item_id: int) -> dict:
    return {
        "id": item_id,
        "sku": f"SKU-{item_id:06d}",
        "title": f"Item number {item_id} with a reasonably descriptive title",
        "description": " ".join(_rng.choice(TAGS) for _ in range(60)),
        "price_cents": _rng.randint(199, 99_999),
        "currency": "EUR",
        "tags": _rng.sample(TAGS, 4),
        "stock": {f"warehouse-{w}": _rng.randint(0, 500) for w in range(6)},
        "reviews": [
            {"user": f"user-{_rng.randint(1, 9999)}", "stars": _rng.randint(1, 5), "text": "fine " * 8}
            for _ in range(12)
        ],
        "attributes": {f"attr_{a}": _rng.random() for a in range(10)},
    }


ITEMS: list[bytes] = [json.dumps(_make_item(i)).encode() for i in range(ITEM_COUNT)]
FOLLOWED: list[list[int]] = [_rng.sample(range(ITEM_COUNT), 8) for _ in range(USER_COUNT)]


def average_stars(reviews: list[dict]) -> float:
    return round(sum(review["stars"] for review in reviews) / len(reviews), 2) if reviews else 0.0


def total_stock(stock: dict[str, int]) -> int:
    return sum(stock.values())


def format_price(cents: int, currency: str) -> str:
    return f"{cents // 100}.{cents % 100:02d} {currency}"


def summarize_item(item: dict) -> dict:
    return {
        "id": item["id"],
        "sku": item["sku"],
        "title": item["title"],
        "price": format_price(item["price_cents"], item["currency"]),
        "rating": average_stars(item["reviews"]),
        "in_stock": total_stock(item["stock"]),
        "tags": sorted(item["tags"]),
    }


def check_order_line(line: dict) -> list[str]:
    problems = []
    if not isinstance(line.get("sku"), str) or not line["sku"].startswith("SKU-"):
        problems.append("bad sku")
    if not isinstance(line.get("quantity"), int) or not 0 < line["quantity"] <= 100:
        problems.append("bad quantity")
    if not isinstance(line.get("unit_price_cents"), int) or line["unit_price_cents"] < 0:
        problems.append("bad price")
    return problems


def line_total(line: dict, discount_percent: int) -> int:
    gross = line["quantity"] * line["unit_price_cents"]
    return gross - gross * discount_percent // 100


def json_response(payload: object) -> Response:
    return Response(json.dumps(payload), media_type="application/json")


async def get_item(request: Request) -> Response:
    item = json.loads(ITEMS[int(request.path_params["item_id"]) % ITEM_COUNT])
    summary = summarize_item(item)
    summary["top_reviews"] = sorted(item["reviews"], key=lambda review: -review["stars"])[:3]
    summary["attributes"] = {name: round(value, 3) for name, value in item["attributes"].items()}
    return json_response(summary)


async def get_feed(request: Request) -> Response:
    followed = FOLLOWED[int(request.path_params["user_id"]) % USER_COUNT]
    items = [summarize_item(json.loads(ITEMS[item_id])) for item_id in followed]
    items.sort(key=lambda item: (-item["rating"], item["id"]))
    by_tag: dict[str, int] = {}
    for item in items:
        for tag in item["tags"]:
            by_tag[tag] = by_tag.get(tag, 0) + 1
    return json_response({"user": request.path_params["user_id"], "items": items, "tags": by_tag})


async def post_order(request: Request) -> Response:
    order = json.loads(await request.body())
    lines = order["lines"]
    problems = {index: found for index, line in enumerate(lines) if (found := check_order_line(line))}
    if problems:
        return JSONResponse({"problems": problems}, status_code=422)
    discount = 10 if order.get("coupon") == "WELCOME10" else 0
    totals = [line_total(line, discount) for line in order["lines"]]
    subtotal = sum(totals)
    tax = subtotal * 21 // 100
    return json_response(
        {
            "order_id": f"{order['customer']['id']}-{len(order['lines'])}-{subtotal}",
            "customer": order["customer"]["name"],
            "lines": [
                {"sku": line["sku"], "quantity": line["quantity"], "total": format_price(total, "EUR")}
                for line, total in zip(order["lines"], totals)
            ],
            "subtotal": format_price(subtotal, "EUR"),
            "tax": format_price(tax, "EUR"),
            "total": format_price(subtotal + tax, "EUR"),
        }
    )


async def block(request: Request) -> Response:
    time.sleep(BLOCK_SECONDS)  # the blocking call every monitor should report
    return json_response({"slept_ms": BLOCK_SECONDS * 1000})


class BlockingReports:
    """Counts the monitor's reports by culprit; the callback runs on the loop thread, so no lock."""

    def __init__(self) -> None:
        self.count = 0
        self.by_culprit: Counter[str] = Counter()
        self.sleep_ms: list[float] = []
        """The durations reported for /block's time.sleep, where the monitor says."""

    def __call__(self, info: Any) -> None:
        self.count += 1
        self.by_culprit[info.method_name] += 1
        if info.method_name == "time.sleep" and hasattr(info, "duration_ms"):
            self.sleep_ms.append(info.duration_ms)


class EmptyHook:
    """The floor every profile-hook monitor pays: an empty C profile hook on the loop thread."""

    def activate(self) -> None:
        from loopwatch import _native

        _native._bench_install_empty_hook()

    def deactivate(self) -> None:
        from loopwatch import _native

        _native._bench_uninstall_hook()


class PyleakMonitor:
    """pyleak's event-loop block detector as a user would run it for a whole service: a thread that
    pings the loop every threshold and, when the ping is late, takes the loop thread's stack with
    `sys._current_frames()`. Each block it finds counts as a report, named by the innermost frame."""

    def __init__(self, reports: BlockingReports) -> None:
        self.reports = reports
        self.detector: Any = None

    def activate(self) -> None:
        import asyncio
        import logging

        from pyleak.eventloop import _EventLoopBlockDetector

        reports = self.reports

        class Counting(_EventLoopBlockDetector):
            def _handle_single_block(self, block_info: Any) -> None:
                stack = block_info.blocking_stack or []
                reports(type("Block", (), {"method_name": stack[-1].name if stack else "?"})())

        self.detector = Counting(
            action="log",
            logger=logging.getLogger("pyleak-bench"),
            threshold=THRESHOLD_MS / 1000,
            check_interval=THRESHOLD_MS / 1000,
            schedule_callback=asyncio.get_running_loop().call_soon_threadsafe,
        )
        self.detector.start_monitoring()

    def deactivate(self) -> None:
        self.detector.stop_monitoring()


def make_monitor(name: str, reports: BlockingReports):
    if name == "none":
        return None
    if name == "floor":
        return EmptyHook()
    if name in ("loopwatch", "loopwatch-no-stalls", "loopwatch-sampling"):
        from loopwatch import EventLoopMonitor

        # Every report counts here: the sanity check compares them with the /block requests.
        # "loopwatch-no-stalls": without the watchdog's reports of steps still running.
        # "loopwatch-sampling": the always-on mode (no profile hook), stalls reported as they run.
        return EventLoopMonitor(
            threshold_ms=THRESHOLD_MS,
            on_blocking_call=reports,
            reports_per_minute=None,
            report_stalls=name != "loopwatch-no-stalls",
            mode="sampling" if name == "loopwatch-sampling" else "exact",
        )
    if name == "pyleak":
        return PyleakMonitor(reports)
    if name == "aelm":
        from asyncio_event_loop_monitor import EventLoopMonitor as PeerMonitor

        return PeerMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=reports)
    raise ValueError(
        "monitor must be none, floor, loopwatch, loopwatch-no-stalls, loopwatch-sampling, aelm or pyleak, "
        f"got {name!r}"
    )


def make_app(monitor_name: str) -> Starlette:
    reports = BlockingReports()
    monitor = make_monitor(monitor_name, reports)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Lifespan startup runs on the loop thread: the monitor's hook stays there for the server's life.
        if monitor is not None:
            monitor.activate()
        try:
            yield
        finally:
            if monitor is not None:
                monitor.deactivate()

    async def stats(request: Request) -> Response:
        if monitor is None or isinstance(monitor, EmptyHook):
            return json_response({"monitor": monitor_name, "blocking_reports": None, "culprits": {}})
        culprits = dict(reports.by_culprit.most_common())
        return json_response(
            {
                "monitor": monitor_name,
                "blocking_reports": reports.count,
                "culprits": culprits,
                "sleep_ms": reports.sleep_ms,
            }
        )

    routes = [
        Route("/items/{item_id:int}", get_item),
        Route("/feed/{user_id:int}", get_feed),
        Route("/orders", post_order, methods=["POST"]),
        Route("/block", block),
        Route("/stats", stats),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--monitor",
        choices=["none", "floor", "loopwatch", "loopwatch-no-stalls", "loopwatch-sampling", "aelm", "pyleak"],
        default="none",
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.monitor),
        host="127.0.0.1",
        port=args.port,
        loop=args.loop,
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
