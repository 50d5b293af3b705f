"""LoopwatchMiddleware on a real uvicorn server on loopback, driven by a real HTTP client: only
selected requests are monitored, each report names its own request, and the hook is off between."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pytest
import uvicorn
from conftest import BLOCK_S, C_LOOPS_BY_CONTEXT, LOOPS, THRESHOLD_MS, short
from loopwatch import BlockingCallInfo, _native
from loopwatch.asgi import LoopwatchMiddleware
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TOKEN = "s3cret-token"


def render_invoice():
    time.sleep(BLOCK_S)  # the sync call a selected request must be blamed for


async def block(request: Request) -> JSONResponse:
    await asyncio.sleep(0.05)  # let concurrent requests all be in flight
    render_invoice()
    return JSONResponse({"ok": True})


async def hook_state(request: Request) -> JSONResponse:
    return JSONResponse({"profiling": _native._watched() is not None})


def endpoint_reports(reports: list[BlockingCallInfo]) -> list[BlockingCallInfo]:
    """The reports of the endpoint's own block. A selected request may also be reported for what
    the server or framework does on the loop in its task (an import at the first request): the
    tests pin the endpoint's episode, not what a library happens to do."""
    return [
        r for r in reports if r.method_name == "time.sleep" and short(r.stack[-2].name) == "render_invoice"
    ]


def make_app(reports: list[BlockingCallInfo], **options: Any) -> LoopwatchMiddleware:
    app = Starlette(routes=[Route("/block", block), Route("/hook", hook_state)])
    return LoopwatchMiddleware(app, threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, **options)


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread of its own (its loop thread)."""

    def __init__(self, app: Any, loop: str) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, loop=loop, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def get(self, path: str, headers: Optional[dict[str, str]] = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


@pytest.fixture(params=LOOPS)
def server_loop(request: pytest.FixtureRequest) -> str:
    return request.param


def test_a_request_with_the_token_is_reported_with_its_context(server_loop):
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports, token=TOKEN), server_loop) as server:
        server.get("/block", {"x-loopwatch": TOKEN, "x-request-id": "req-1"})
        assert server.get("/hook") == {"profiling": False}
    [report] = endpoint_reports(reports)
    assert report.duration_ms >= BLOCK_S * 1000
    assert report.context == {"method": "GET", "path": "/block", "request_id": "req-1"}
    assert all(r.context == report.context for r in reports)


def test_a_wrong_token_or_none_never_reports(server_loop):
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports, token=TOKEN), server_loop) as server:
        server.get("/block", {"x-loopwatch": "guess"})
        server.get("/block", {"x-loopwatch": TOKEN[:-1]})
        server.get("/block")
    assert reports == []


def test_without_a_configured_token_the_header_selects_nothing(server_loop):
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports), server_loop) as server:
        server.get("/block", {"x-loopwatch": TOKEN})
        server.get("/block", {"x-loopwatch": ""})
    assert reports == []


def test_sampling_selects_requests_without_a_token(server_loop):
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports, sample_rate=1.0), server_loop) as server:
        server.get("/block")
    [report] = endpoint_reports(reports)
    request_id = report.context["request_id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0  # made up: the client sent none


def test_concurrent_requests_on_one_loop_are_reported_to_their_own_request(server_loop):
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports, token=TOKEN), server_loop) as server:
        calls = [
            ("/block", {"x-loopwatch": TOKEN, "x-request-id": "first"}),
            ("/block", {}),  # not selected: blocks the same loop, must never be reported
            ("/block", {"x-loopwatch": TOKEN, "x-request-id": "second"}),
        ]
        with ThreadPoolExecutor(len(calls)) as pool:
            list(pool.map(lambda call: server.get(*call), calls))
        assert server.get("/hook") == {"profiling": False}
    assert sorted(r.context["request_id"] for r in endpoint_reports(reports)) == ["first", "second"]
    assert {r.context["request_id"] for r in reports} == {"first", "second"}
    for report in endpoint_reports(reports):
        assert report.duration_ms >= BLOCK_S * 1000


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the always-on mode needs CPython 3.11+")
def test_always_on_every_request_is_reported_to_itself_and_selected_ones_exactly(server_loop):
    if server_loop != "asyncio" and not C_LOOPS_BY_CONTEXT:
        pytest.skip("before 3.14 the always-on mode sees asyncio's own loops only")
    reports: list[BlockingCallInfo] = []
    with Server(make_app(reports, token=TOKEN, always_on=True), server_loop) as server:
        calls = [
            ("/block", {"x-loopwatch": TOKEN, "x-request-id": "selected"}),
            ("/block", {"x-request-id": "plain-1"}),
            ("/block", {"x-request-id": "plain-2"}),
        ]
        with ThreadPoolExecutor(len(calls)) as pool:
            list(pool.map(lambda call: server.get(*call), calls))
        assert server.get("/hook") == {"profiling": False}
    found = {r.context["request_id"]: r for r in endpoint_reports(reports)}
    assert sorted(found) == ["plain-1", "plain-2", "selected"]
    # Each request is watched one way: the selected one exactly, the others always on.
    assert {name: info.sampled for name, info in found.items()} == {
        "selected": False,
        "plain-1": True,
        "plain-2": True,
    }
    assert all(info.duration_ms >= BLOCK_S * 1000 for info in found.values())
    assert len(reports) == len({(r.context["request_id"], r.timestamp) for r in reports})


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="before 3.11 only")
def test_always_on_is_refused_before_3_11():
    with pytest.raises(ValueError, match=r"needs CPython 3\.11 or newer"):
        make_app([], always_on=True)


def test_an_endpoint_run_in_a_child_task_by_inner_middleware_is_still_the_request(server_loop):
    # Starlette's BaseHTTPMiddleware (FastAPI's @app.middleware("http")) runs the endpoint in a
    # task of its own: it inherits the request's scope.
    reports: list[BlockingCallInfo] = []

    async def passthrough(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    inner = Starlette(routes=[Route("/block", block)])
    inner.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    app = LoopwatchMiddleware(inner, threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, token=TOKEN)
    with Server(app, server_loop) as server:
        server.get("/block", {"x-loopwatch": TOKEN, "x-request-id": "inner"})
        server.get("/block")
    assert [report.context["request_id"] for report in endpoint_reports(reports)] == ["inner"]
    assert {report.context["request_id"] for report in reports} == {"inner"}


def test_a_plain_asgi_app_is_monitored_too(server_loop):
    reports: list[BlockingCallInfo] = []

    async def plain_app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        render_invoice()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})

    app = LoopwatchMiddleware(
        plain_app, threshold_ms=THRESHOLD_MS, on_blocking_call=reports.append, sample_rate=1.0
    )
    with Server(app, server_loop) as server:
        server.get("/anything?x=1")
    [report] = endpoint_reports(reports)
    assert report.context["path"] == "/anything"


def test_bad_settings_are_refused_when_the_app_is_built():
    app = Starlette()
    with pytest.raises(ValueError, match=r"sample_rate must be between 0\.0 and 1\.0"):
        LoopwatchMiddleware(app, sample_rate=2)
    with pytest.raises(ValueError, match="token must be a non-empty string"):
        LoopwatchMiddleware(app, token="")
    with pytest.raises(ValueError, match="threshold_ms must be > 0"):
        LoopwatchMiddleware(app, threshold_ms=-1)
