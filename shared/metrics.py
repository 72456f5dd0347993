"""Metrics: an OpenTelemetry MeterProvider read by Prometheus, the text exposition every process
serves on `/metrics`, and the instruments several services share (phase durations, RPC durations).

Names follow OpenTelemetry (`renderflow.phase.duration`, unit `s`); the Prometheus exporter turns
them into `renderflow_phase_duration_seconds`, counters get `_total`. Queries an SRE starts from:

- 5xx rate per route: `sum by (http_route) (rate(renderflow_http_server_requests_total
  {http_response_status_class="5xx"}[5m])) / sum by (http_route) (rate(...[5m]))`, and the error
  codes behind it: `sum by (http_route, error_code) (rate(renderflow_http_server_requests_total[5m]))`
- p95 of a phase: `histogram_quantile(0.95, sum by (le, phase)
  (rate(renderflow_phase_duration_seconds_bucket[5m])))`
- image-fetch cache hit ratio: `rate(imagefetch_cache_hits_total[5m])
  / (rate(imagefetch_cache_hits_total[5m]) + rate(imagefetch_cache_misses_total[5m]))`
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.view import DropAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.exposition import choose_encoder

from shared.contract import PHASES

SCOPE = "renderflow"
DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Bucket edges of every duration histogram, in seconds: sub-millisecond submits to 5-minute videos."""


# The aiohttp instrumentations' durations (old conventions) carry no route but the peer's host and
# port: one series per origin an image came from. `renderflow.http.server.duration` (by route) and
# `imagefetch.origin.duration` (by outcome) say what they would, at a bounded cost.
_VIEWS = [
    View(instrument_name=name, aggregation=DropAggregation())
    for name in ("http.server.duration", "http.client.duration")
]


def build_meter_provider(resource: Resource, registry: CollectorRegistry = REGISTRY) -> MeterProvider:
    """A MeterProvider whose metrics `registry` exposes in the Prometheus text format (the process's
    default registry, which also holds the process collectors: CPU, memory, file descriptors)."""
    # No otel_scope_* labels: metric names are unique across scopes here, and shorter series read better.
    reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
    # The Prometheus text format carries no exemplars: sampling them would cost every measurement
    # made inside a sampled span for nothing.
    return MeterProvider(
        resource=resource, metric_readers=[reader], views=_VIEWS, exemplar_filter=AlwaysOffExemplarFilter()
    )


def exposition(accept: str | None = None, registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The current metrics and their content type: Prometheus text, or OpenMetrics when `accept`
    (an Accept header) asks for it."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


@dataclass
class MetricsServer:
    """`GET /metrics` on a port of its own, served from a daemon thread (for the gRPC services and the
    workers, which have no HTTP server)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stops serving and waits for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serves `registry` on http://host:port/metrics until `stop`; OSError when the port is taken."""
    server, thread = start_http_server(port, host, registry)
    return MetricsServer(server, thread)


def phase_histogram(meter: metrics.Meter) -> metrics.Histogram:
    """`renderflow.phase.duration`: seconds per phase (`phase`, and `render.kind` where known)."""
    return meter.create_histogram(
        "renderflow.phase.duration",
        unit="s",
        description=f"Duration of each phase of a render ({', '.join(PHASES)})",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
    )
