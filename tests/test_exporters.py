"""The exporters with the real libraries: a Prometheus endpoint scraped over HTTP, OpenTelemetry
through the SDK's in-memory reader and span exporter, DogStatsD over UDP on loopback."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import urllib.request

import datadog
import prometheus_client
import pytest
from conftest import BLOCK_S, THRESHOLD_MS
from loopwatch import EventLoopMonitor
from loopwatch.exporters import (
    OTHER,
    CulpritLabels,
    OpenTelemetryExporter,
    PrometheusExporter,
    StatsdExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def load_report():
    time.sleep(BLOCK_S)


async def two_blocking_steps():
    for _ in range(2):
        await asyncio.sleep(0)
        load_report()


def run_monitored(exporter) -> None:
    async def main():
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=exporter):
            await two_blocking_steps()

    asyncio.run(main())


def test_prometheus_metrics_are_scraped_over_http():
    registry = prometheus_client.CollectorRegistry()
    run_monitored(PrometheusExporter(registry=registry, namespace="svc"))
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
    labels = 'culprit="time.sleep",kind="call"'
    assert f"svc_event_loop_blocking_total{{{labels}}} 2.0" in text
    assert f"svc_event_loop_blocking_seconds_count{{{labels}}} 2.0" in text
    total = next(
        line
        for line in text.splitlines()
        if line.startswith(f"svc_event_loop_blocking_seconds_sum{{{labels}}}")
    )
    assert float(total.rsplit(" ", 1)[1]) >= 2 * BLOCK_S


def other_report():
    time.sleep(BLOCK_S)


def test_a_step_with_two_culprits_adds_the_loops_blocked_time_once():
    registry = prometheus_client.CollectorRegistry()
    reports = []

    def export(info):
        reports.append(info)
        exporter(info)

    exporter = PrometheusExporter(registry=registry)

    async def main():
        with EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=export):
            load_report()
            other_report()  # the same step: two culprits of one episode
            await asyncio.sleep(0)

    asyncio.run(main())
    assert [info.culprits_in_episode for info in reports] == [2, 2]
    step_s = reports[0].duration_ms / 1000
    labels = {"culprit": "time.sleep", "kind": "call"}
    observed = registry.get_sample_value("event_loop_blocking_seconds_sum", labels)
    assert registry.get_sample_value("event_loop_blocking_seconds_count", labels) == 2
    # Each culprit's share: together the step, not twice the step.
    assert 2 * BLOCK_S <= observed <= step_s


def test_opentelemetry_histogram_and_span_event():
    reader = InMemoryMetricReader()
    exporter = OpenTelemetryExporter(meter=MeterProvider(metric_readers=[reader]).get_meter("test"))
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = tracer_provider.get_tracer("test")

    async def main():
        monitor = EventLoopMonitor(threshold_ms=THRESHOLD_MS, on_blocking_call=exporter)
        with monitor, tracer.start_as_current_span("handle-request"):
            await two_blocking_steps()
            # A step is reported when it ends: here, still inside the span.
            await asyncio.sleep(0)

    asyncio.run(main())
    points = [
        point
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "event_loop.blocking.duration"
        for point in metric.data.data_points
    ]
    assert len(points) == 1
    assert dict(points[0].attributes) == {"culprit": "time.sleep", "kind": "call"}
    assert points[0].count == 2 and points[0].sum >= 2 * BLOCK_S * 1000
    (span,) = spans.get_finished_spans()
    events = [event for event in span.events if event.name == "event_loop.blocking"]
    assert len(events) == 2
    assert events[0].attributes["culprit"] == "time.sleep"
    assert events[0].attributes["duration_ms"] >= BLOCK_S * 1000


def test_dogstatsd_distribution_arrives_over_udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        client = datadog.DogStatsd(host="127.0.0.1", port=listener.getsockname()[1], disable_buffering=True)
        run_monitored(StatsdExporter(client, tags=["service:api"]))
        datagrams = [listener.recv(4096).decode().strip() for _ in range(2)]
    for datagram in datagrams:
        name, rest = datagram.split(":", 1)
        value, kind, tags = rest.split("|", 2)
        assert name == "event_loop.blocking.duration_ms"
        assert kind == "d" and float(value) >= BLOCK_S * 1000
        assert tags == "#service:api,method:time.sleep,kind:call"


def test_culprit_labels_stay_bounded():
    labels = CulpritLabels(max_culprits=2)
    assert [labels(name) for name in ["a", "b", "c", "a", "d"]] == ["a", "b", OTHER, "a", OTHER]


def test_a_client_without_a_metric_method_is_refused():
    with pytest.raises(TypeError, match=r"client must have distribution\(\)"):
        StatsdExporter(object())


def test_a_missing_library_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'loopwatch\[prometheus\]'"):
        PrometheusExporter()
