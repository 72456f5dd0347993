"""Telemetry bootstrap: traces, metrics and the phase budgets, from the standard `OTEL_*` variables.

Traces go by OTLP to a collector when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is set,
over gRPC or `http/protobuf` (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`); otherwise as OTLP-JSON lines
appended to `<run dir>/traces.jsonl`, which every process of the run shares, rotated by size to
`traces.jsonl.1`, `.2`, ... (RENDERFLOW_TRACES_MAX_BYTES, RENDERFLOW_TRACES_BACKUPS).
`OTEL_TRACES_SAMPLER` is honoured by the SDK, `OTEL_TRACES_EXPORTER=none` turns tracing off,
`OTEL_SDK_DISABLED=true` turns traces and metrics off.
Metrics are read by Prometheus: see `shared.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TraceState
from opentelemetry.util.types import Attributes
from yarl import URL

from shared.contract import PHASE_BUDGETS_MS, PHASES
from shared.errors import RenderflowError
from shared.logs import RotatingFile
from shared.metrics import MetricsServer, build_meter_provider, serve_metrics
from shared.settings import ConfigError, Env

log = logging.getLogger(__name__)

TRACES_FILE = "traces.jsonl"
"""The span file under the run directory when no collector is configured."""
TRACES_MAX_BYTES = 50 * 1024 * 1024
"""RENDERFLOW_TRACES_MAX_BYTES: the span file's size past which it is rotated (0: never)."""
TRACES_BACKUPS = 3
"""RENDERFLOW_TRACES_BACKUPS: rotated span files kept (`traces.jsonl.1` is the newest)."""
EXPORT_BATCH_SPANS = 64
"""OTEL_BSP_MAX_EXPORT_BATCH_SIZE: spans exported at a time; 64 here (the SDK's default is 512), so
that the export thread holds the interpreter only briefly."""

# The standard variables read here, named and meant as the OpenTelemetry specification says.
SDK_DISABLED = "OTEL_SDK_DISABLED"
"""OTEL_SDK_DISABLED: `true` turns traces and metrics off (default `false`)."""
SERVICE_NAME = "OTEL_SERVICE_NAME"
"""OTEL_SERVICE_NAME: the `service.name` of the process's spans and metrics (default: the component's,
e.g. `gateway`, `generation-worker`); OTEL_RESOURCE_ATTRIBUTES adds attributes."""
TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
"""OTEL_TRACES_EXPORTER: `none` turns tracing off; `otlp` sends spans to a collector (the default when
an endpoint is set); unset and without an endpoint, spans go to `<run dir>/traces.jsonl`."""
OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT: the collector to send spans to
(the first wins); the exporters also read their headers, timeout and compression variables."""
OTLP_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
"""OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL: `grpc` (the default) or
`http/protobuf` (the first wins)."""
METRICS_PORT = "RENDERFLOW_METRICS_PORT"
"""RENDERFLOW_METRICS_PORT: the port of this process's Prometheus `/metrics` (0: not served; the
gateway serves it on its own port; `renderflow run` gives each process one)."""
METRICS_HOST = "RENDERFLOW_METRICS_HOST"
"""RENDERFLOW_METRICS_HOST: the address `/metrics` is served on (default `127.0.0.1`)."""


class JsonLinesSpanExporter(SpanExporter):
    """Appends each batch of spans as one OTLP/JSON line (an ExportTraceServiceRequest), as a
    collector's file exporter writes them: ids in hex, enums as integers, 64-bit integers as strings.

    The JSON is built straight from the spans and written by orjson (through protobuf, or with the
    standard library's encoder, it costs several times more, in a thread that holds the GIL the
    service needs).

    Every process of a run appends to the same file: each line is one write, under a lock that
    every writer takes (an flock, held for microseconds once a batch), and whichever writer would
    take the file past `max_bytes` rotates it; the others notice the rename and reopen the path,
    so no line is split, or written to a file already rotated away.
    """

    def __init__(
        self, path: Path, *, max_bytes: int = TRACES_MAX_BYTES, backups: int = TRACES_BACKUPS
    ) -> None:
        self._file = RotatingFile(path, max_bytes, backups, shared=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._file.write(orjson.dumps(otlp_json(spans), option=orjson.OPT_APPEND_NEWLINE))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """The ExportTraceServiceRequest of `spans` in the OTLP/JSON encoding."""
    grouped: dict[int, tuple[Resource, dict[Any, list[dict[str, Any]]]]] = {}
    for span in spans:
        _, scopes = grouped.setdefault(id(span.resource), (span.resource, {}))
        scopes.setdefault(span.instrumentation_scope, []).append(_span_json(span))
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes_json(resource.attributes)},
                "scopeSpans": [
                    {"scope": _scope_json(scope), "spans": encoded} for scope, encoded in scopes.items()
                ],
            }
            for resource, scopes in grouped.values()
        ]
    }


def _span_json(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    encoded: dict[str, Any] = {
        "traceId": format(context.trace_id, "032x"),
        "spanId": format(context.span_id, "016x"),
        "name": span.name,
        "kind": span.kind.value + 1,  # the API's INTERNAL is 0, OTLP's SPAN_KIND_INTERNAL is 1
        "startTimeUnixNano": str(span.start_time or 0),
        "endTimeUnixNano": str(span.end_time or 0),
    }
    if span.parent is not None:
        encoded["parentSpanId"] = format(span.parent.span_id, "016x")
    if span.attributes:
        encoded["attributes"] = _attributes_json(span.attributes)
    if span.events:
        encoded["events"] = [
            {
                "timeUnixNano": str(event.timestamp),
                "name": event.name,
                "attributes": _attributes_json(event.attributes or {}),
            }
            for event in span.events
        ]
    if span.links:
        encoded["links"] = [
            {
                "traceId": format(link.context.trace_id, "032x"),
                "spanId": format(link.context.span_id, "016x"),
                "attributes": _attributes_json(link.attributes or {}),
            }
            for link in span.links
        ]
    if span.status.status_code is not StatusCode.UNSET:
        encoded["status"] = {"code": span.status.status_code.value, "message": span.status.description or ""}
    return encoded


def _scope_json(scope: InstrumentationScope | None) -> dict[str, str]:
    if scope is None:
        return {}
    return {"name": scope.name, "version": scope.version or ""}


def _attributes_json(attributes: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _value_json(value)} for key, value in attributes.items()]


def _value_json(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_value_json(item) for item in value]}}
    return {"stringValue": str(value)}


@dataclass(frozen=True)
class Budgets:
    """Slow-operation thresholds per phase, in milliseconds; a phase without one is reported, never
    warned about. A phase over its budget logs one `slow operation` warning with the whole timing
    breakdown."""

    ms: Mapping[str, float] = field(default_factory=lambda: dict(PHASE_BUDGETS_MS))
    """The phases that have a budget, and theirs (by default the contract's)."""

    @classmethod
    def from_env(cls, env: Env) -> Budgets:
        """The contract's budgets, each replaced by RENDERFLOW_BUDGET_<PHASE>_MS when set (0: none)."""
        budgets = dict(PHASE_BUDGETS_MS)
        for phase in PHASES:
            name = f"RENDERFLOW_BUDGET_{phase.upper()}_MS"
            if env.optional(name) is not None:
                budgets[phase] = env.float(name, 0.0, minimum=0)
        return cls({phase: ms for phase, ms in budgets.items() if ms})

    def of(self, phase: str) -> float | None:
        """The budget of `phase`, or None for phases without one."""
        return self.ms.get(phase)


@dataclass
class Telemetry:
    """What `setup_telemetry` installed; `shutdown` flushes buffered spans and stops serving metrics."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    metrics_server: MetricsServer | None = None

    def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def setup_telemetry(service: str, env: Env, run_dir: Path, *, metrics_port: int = 0) -> Telemetry:
    """Installs this process's global tracer and meter providers (SQL is traced by the connections'
    cursors: `shared.statements`), and serves `/metrics` on RENDERFLOW_METRICS_PORT (default
    `metrics_port`; 0: not served, as for the gateway, which serves it on its own port) at
    RENDERFLOW_METRICS_HOST (default 127.0.0.1). Call once, in the entry point."""
    if env.bool(SDK_DISABLED, False):
        return Telemetry(None, None)
    resource = build_resource(service, env)
    tracer_provider = build_tracer_provider(resource, env, run_dir)
    if tracer_provider is not None:
        trace.set_tracer_provider(tracer_provider)
    meter_provider = build_meter_provider(resource)
    metrics.set_meter_provider(meter_provider)
    telemetry = Telemetry(tracer_provider, meter_provider)
    port = env.int(METRICS_PORT, metrics_port, minimum=0)
    if port:
        host = env.str(METRICS_HOST, "127.0.0.1")
        try:
            telemetry.metrics_server = serve_metrics(host, port)
        except OSError as exc:
            # Metrics are worth a loud complaint, not a service that refuses to start.
            log.error("cannot serve /metrics", extra={"host": host, "port": port, "error": str(exc)})
    return telemetry


def build_resource(service: str, env: Env) -> Resource:
    """The resource of this process's spans and metrics (OTEL_SERVICE_NAME overrides `service`;
    OTEL_RESOURCE_ATTRIBUTES adds attributes)."""
    return Resource.create({"service.name": env.str(SERVICE_NAME, service)})


def build_tracer_provider(resource: Resource, env: Env, run_dir: Path) -> TracerProvider | None:
    """A tracer provider exporting as the `OTEL_*` variables say, or None when tracing is off."""
    exporter = span_exporter(env, run_dir)
    if exporter is None:
        return None
    # The sampler OTEL_TRACES_SAMPLER names (read by the SDK's own, private, helper), which follows
    # links for the roots of linked traces.
    provider = TracerProvider(resource=resource, sampler=FollowLinks(sampling._get_from_env_or_default()))
    # Small batches, exported often: the export thread holds the GIL the event loop needs while it
    # encodes a batch, and the SDK's 512 spans (~6 ms) showed in the submit's p99 (64 spans: ~8 %
    # lower p99 at 64 clients, `tests.bench.profile_submit`). OTEL_BSP_MAX_EXPORT_BATCH_SIZE wins.
    batch = env.int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", EXPORT_BATCH_SPANS, minimum=1)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
    return provider


class FollowLinks(Sampler):
    """A root span that links to other spans (a job's trace, linked to the request that submitted
    it) is kept when one of them was, and dropped when none was, so that a sampled request comes
    with its job's trace; every other decision is `delegate`'s (a ratio of one in ten would
    otherwise keep the job of one kept request in ten)."""

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        linked = [link.context for link in links or () if link.context.is_valid]
        if linked and not trace.get_current_span(parent_context).get_span_context().is_valid:
            if any(context.trace_flags.sampled for context in linked):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return SamplingResult(Decision.DROP)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"FollowLinks{{{self._delegate.get_description()}}}"


def span_exporter(env: Env, run_dir: Path) -> SpanExporter | None:
    """OTLP when an endpoint is set (or OTEL_TRACES_EXPORTER=otlp), None for OTEL_TRACES_EXPORTER=none,
    else the OTLP-JSON lines file under `run_dir`, rotated at RENDERFLOW_TRACES_MAX_BYTES."""
    chosen = env.str(TRACES_EXPORTER, "").strip().lower()
    if chosen == "none":
        return None
    if chosen not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {chosen!r}")
    endpoint = next(filter(None, map(env.optional, OTLP_ENDPOINTS)), None)
    if endpoint is None and chosen != "otlp":
        return JsonLinesSpanExporter(
            run_dir / TRACES_FILE,
            max_bytes=env.int("RENDERFLOW_TRACES_MAX_BYTES", TRACES_MAX_BYTES, minimum=0),
            backups=env.int("RENDERFLOW_TRACES_BACKUPS", TRACES_BACKUPS, minimum=1),
        )
    # The exporters read their endpoint, headers, timeout and compression from the same variables.
    protocol = next(filter(None, map(env.optional, OTLP_PROTOCOLS)), "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got {protocol!r}")


def record_failure(span: Span, exc: BaseException) -> None:
    """Marks `span` with what went wrong: a domain error's code as `error.code`; the exception and an
    ERROR status for faults of the server's side (5xx-class errors and anything unexpected), not for
    the caller's mistakes (not found, invalid, unauthenticated, too large), which are outcomes."""
    status = 500
    if isinstance(exc, RenderflowError):
        span.set_attribute("error.code", exc.code)
        status = exc.http_status
    elif isinstance(exc, web.HTTPException):
        status = exc.status
    if status < 500:
        return
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def http_client_tracing() -> list[aiohttp.TraceConfig]:
    """`trace_configs` for an aiohttp ClientSession: a CLIENT span per request, with the URL stripped of
    its query and credentials (signed URLs carry secrets there)."""
    return [create_trace_config(url_filter=_without_secrets)]


def _without_secrets(url: URL) -> str:
    return str(url.with_user(None).with_query(None).with_fragment(None))
