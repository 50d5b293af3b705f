"""Per-request monitoring for any ASGI app (Starlette, FastAPI, plain ASGI): the hook runs only
while a selected request is in flight, and only selected requests are ever reported.

    app = LoopwatchMiddleware(app, threshold_ms=10, token=os.environ["LOOPWATCH_TOKEN"], sample_rate=0.01)

A request is selected when it carries the secret token in the ``x-loopwatch`` header (compared in
constant time; with no token configured the header does nothing), or by the sample rate. With
``always_on=True`` (CPython 3.11+) every other request is watched too, in the always-on mode.
"""

from __future__ import annotations

import hmac
import random
import uuid
from collections.abc import Awaitable, Iterable, MutableMapping
from typing import Any, Callable, Optional

from loopwatch._limits import DEFAULT_REPORTS_PER_MINUTE
from loopwatch._monitor import EventLoopMonitor, _check_mode
from loopwatch._recording import PathArg
from loopwatch._report import BlockingCallCallback
from loopwatch._scope import monitor_current_task

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LoopwatchMiddleware:
    """Wraps an ASGI app so that selected requests are monitored, each on its own.

    Args:
        app: the ASGI app to wrap.
        threshold_ms: a step of a selected request that keeps the loop this long is reported.
        token: the secret a request must present in ``header`` to be selected. ``None`` (the
            default) means the header selects nothing.
        header: the request header that carries the token.
        sample_rate: the share of requests selected at random, from 0.0 (none) to 1.0 (all).
        on_blocking_call: called with each report, whose ``context`` holds the request's
            ``method``, ``path`` and ``request_id``; by default reports are logged.
        include_paths, exclude_paths: see `EventLoopMonitor`.
        request_id_header: where a request id is taken from when the client sent one; otherwise
            one is made up.
        reports_per_minute, record_to: see `EventLoopMonitor`; each recorded report keeps
            its request's ``context``.
        report_stalls: see `monitor_current_task` (off by default: a stall reported while it
            runs may be another request's).
        always_on: also watch every request that is not selected, in the always-on mode
            (``mode="sampling"`` of `EventLoopMonitor`, CPython 3.11+): no profile hook, each
            blocking step timed exactly and blamed from the stack read while it ran. Selected
            requests get the exact mode instead; a request is reported by one or the other.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        threshold_ms: float = 10.0,
        token: Optional[str] = None,
        header: str = "x-loopwatch",
        sample_rate: float = 0.0,
        on_blocking_call: Optional[BlockingCallCallback] = None,
        include_paths: Optional[Iterable[str]] = None,
        exclude_paths: Optional[Iterable[str]] = None,
        request_id_header: str = "x-request-id",
        reports_per_minute: Optional[int] = DEFAULT_REPORTS_PER_MINUTE,
        record_to: Optional[PathArg] = None,
        report_stalls: bool = False,
        always_on: bool = False,
    ) -> None:
        if not isinstance(always_on, bool):
            raise TypeError(f"always_on must be True or False, got {type(always_on).__name__}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string, or None to select by sampling only")
        if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool):
            raise TypeError(f"sample_rate must be a number, got {type(sample_rate).__name__}")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0.0 and 1.0, got {sample_rate}")
        for name, value in (("header", header), ("request_id_header", request_id_header)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty header name, got {value!r}")
        self.app = app
        self._token = token.encode() if token is not None else None
        self._header = header.lower().encode("latin-1")
        self._request_id_header = request_id_header.lower().encode("latin-1")
        self._sample_rate = float(sample_rate)
        # Checked now, where a mistake is made, rather than at the first selected request.
        self._settings = EventLoopMonitor(
            threshold_ms,
            include_paths,
            exclude_paths,
            on_blocking_call,
            reports_per_minute,
            record_to,
            report_stalls,
        )._checked_settings()
        # Checked now too: the always-on mode needs 3.11+.
        self._always_on = {**self._settings, "mode": _check_mode("sampling")} if always_on else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        settings = self._settings if self._selected(scope) else self._always_on
        if settings is None:
            await self.app(scope, receive, send)
            return
        context = {
            "method": scope.get("method", "WEBSOCKET"),
            "path": scope.get("path", ""),
            "request_id": self._header_value(scope, self._request_id_header) or uuid.uuid4().hex,
        }
        async with monitor_current_task(context=context, **settings):
            await self.app(scope, receive, send)

    def _selected(self, scope: Scope) -> bool:
        if self._token is not None:
            presented = self._header_value(scope, self._header)
            if presented is not None and hmac.compare_digest(presented.encode("latin-1"), self._token):
                return True
        return self._sample_rate > 0.0 and random.random() < self._sample_rate

    @staticmethod
    def _header_value(scope: Scope, name: bytes) -> Optional[str]:
        for key, value in scope.get("headers") or ():
            if key.lower() == name:
                return bytes(value).decode("latin-1")
        return None
