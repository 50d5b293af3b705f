"""Reports as metrics where fleets already collect them: Prometheus, OpenTelemetry, statsd and
DogStatsD. Each exporter is a callable to pass as ``on_blocking_call``.

    monitor = EventLoopMonitor(threshold_ms=10, on_blocking_call=PrometheusExporter())

Label values are bounded: the first ``max_culprits`` distinct culprits keep their names, later
ones are counted as ``"other"``, so a service full of different stalls cannot explode a time
series database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, cast

from loopwatch._report import BlockingCallInfo

OTHER = "other"
"""The culprit label of every culprit past the first ``max_culprits``."""

# Blocking episodes start at the threshold (typically 10-100 ms) and can last seconds.
DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _require(module: str, extra: str, exporter: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(
            f"{exporter} needs the {module.split('.')[0]} package: pip install 'loopwatch[{extra}]'"
        ) from error


class CulpritLabels:
    """Keeps the set of culprit label values bounded: the first `max_culprits` names as they are,
    everything later as ``"other"``. Thread-safe: monitors on several loops may share one."""

    def __init__(self, max_culprits: int = 50) -> None:
        if not isinstance(max_culprits, int) or isinstance(max_culprits, bool) or max_culprits < 0:
            raise ValueError(f"max_culprits must be a whole number >= 0, got {max_culprits!r}")
        self.max_culprits = max_culprits
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, culprit: str) -> str:
        if culprit in self._known:
            return culprit
        with self._lock:
            if len(self._known) < self.max_culprits:
                self._known.add(culprit)
                return culprit
        return OTHER


class PrometheusExporter:
    """A histogram of blocking seconds and a counter of episodes, both labelled by culprit and
    kind: ``event_loop_blocking_seconds`` and ``event_loop_blocking_total`` (with ``namespace``
    as a prefix when given), registered in ``registry`` (the default registry otherwise). The
    counter includes episodes the monitor's rate limit held back; for every duration in the
    histogram, give the monitor ``reports_per_minute=None``."""

    def __init__(
        self,
        registry: Any = None,
        namespace: str = "",
        max_culprits: int = 50,
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> None:
        prometheus = _require("prometheus_client", "prometheus", "PrometheusExporter")
        self._labels = CulpritLabels(max_culprits)
        options: dict[str, Any] = {"namespace": namespace, "labelnames": ("culprit", "kind")}
        if registry is not None:
            options["registry"] = registry
        self.seconds = prometheus.Histogram(
            "event_loop_blocking_seconds",
            "How long each blocking episode kept the event loop",
            buckets=tuple(buckets),
            **options,
        )
        self.episodes = prometheus.Counter(
            "event_loop_blocking", "Blocking episodes of the event loop", **options
        )

    def __call__(self, info: BlockingCallInfo) -> None:
        culprit, kind = self._labels(info.method_name), info.kind
        # A step with several culprits: each observes its own share, so the loop's blocked time
        # is counted once across them (`BlockingCallInfo.share_ms`).
        self.seconds.labels(culprit, kind).observe(info.blamed_ms / 1000)
        # Episodes the rate limit held back still count (their durations are not known here).
        self.episodes.labels(culprit, kind).inc(1 + info.suppressed)


class OpenTelemetryExporter:
    """A histogram instrument ``event_loop.blocking.duration`` (ms) with ``culprit`` and ``kind``
    attributes, and an ``event_loop.blocking`` event on the current span when one is recording.
    A report is delivered in the task it blocked, when the blocking step ends: a step that also
    ends its span before yielding to the loop is reported after the span closed, without event."""

    def __init__(self, meter: Any = None, max_culprits: int = 50) -> None:
        metrics = _require("opentelemetry.metrics", "opentelemetry", "OpenTelemetryExporter")
        self._trace = _require("opentelemetry.trace", "opentelemetry", "OpenTelemetryExporter")
        self._labels = CulpritLabels(max_culprits)
        meter = meter if meter is not None else metrics.get_meter("loopwatch")
        self.duration = meter.create_histogram(
            "event_loop.blocking.duration",
            unit="ms",
            description="How long each blocking episode kept the event loop",
        )

    def __call__(self, info: BlockingCallInfo) -> None:
        attributes = {"culprit": self._labels(info.method_name), "kind": info.kind}
        self.duration.record(info.blamed_ms, attributes=attributes)
        span = self._trace.get_current_span()
        if span.is_recording():
            span.add_event(
                "event_loop.blocking",
                attributes={
                    "culprit": info.method_name,
                    "kind": info.kind,
                    "duration_ms": info.duration_ms,
                    "share_ms": info.blamed_ms,
                    "location": info.location,
                    "episode_id": info.episode_id,
                    "culprits_in_episode": info.culprits_in_episode,
                },
            )


class StatsdExporter:
    """Sends each episode's duration to a statsd client you already have. A DogStatsD client
    (``datadog.DogStatsd``, anything with ``distribution(metric, value, tags=...)``) gets a
    distribution tagged ``method:<culprit>`` and ``kind:<kind>``; a plain statsd client
    (``statsd.StatsClient``, anything with ``timing(metric, ms)``) gets a timing."""

    def __init__(
        self,
        client: Any,
        metric: str = "event_loop.blocking.duration_ms",
        tags: Optional[Iterable[str]] = None,
        max_culprits: int = 50,
    ) -> None:
        distribution = getattr(client, "distribution", None)
        timing = getattr(client, "timing", None)
        if not callable(distribution) and not callable(timing):
            raise TypeError(
                "client must have distribution() (DogStatsD) or timing() (statsd), "
                f"got {type(client).__name__}"
            )
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty name, got {metric!r}")
        self.metric = metric
        self._tags = list(tags) if tags is not None else []
        self._labels = CulpritLabels(max_culprits)
        # DogStatsD's tagged distribution where the client has one, else a plain timing.
        self._send: Callable[[BlockingCallInfo], None]
        if callable(distribution):
            self._send = lambda info: distribution(self.metric, info.blamed_ms, tags=self._tags_of(info))
        else:
            plain = cast(Callable[[str, float], Any], timing)  # checked above: one of the two is there
            self._send = lambda info: plain(self.metric, info.blamed_ms)

    def _tags_of(self, info: BlockingCallInfo) -> list[str]:
        return [*self._tags, f"method:{self._labels(info.method_name)}", f"kind:{info.kind}"]

    def __call__(self, info: BlockingCallInfo) -> None:
        self._send(info)
