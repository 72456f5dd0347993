"""OTLP/JSON fixture lines for the trace report tests, built the way Renderflow's processes export
them, and a check that they are real OTLP (ExportTraceServiceRequest) messages."""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.json_format import ParseDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T0_NS = int(T0.timestamp()) * 1_000_000_000
SUBMIT = "/renderflow.v1.GenerationService/Submit"
POST_MS = [60, 61, 62, 63, 64, 65, 66, 67, 300, 220]
"""Durations of the ten `POST /v1/renders` requests of `renders_scenario`."""


def attribute(key: str, value: object) -> dict[str, Any]:
    """One OTLP key-value, encoded as protobuf's JSON mapping does (int64 as a string)."""
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": str(value)}}


@dataclass
class Otlp:
    """Spans added one by one, written as one ExportTraceServiceRequest line per service and trace."""

    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _batches: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    traces: dict[str, str] = field(default_factory=dict)
    """Trace id of each labelled trace (`new_trace(label)`)."""

    def new_trace(self, label: str = "") -> str:
        trace_id = f"{next(self._ids):032x}"
        if label:
            self.traces[label] = trace_id
        return trace_id

    def span(
        self,
        service: str,
        trace_id: str,
        name: str,
        start_ms: float,
        duration_ms: float,
        parent: str | None = None,
        kind: str = "SPAN_KIND_INTERNAL",
        attrs: dict[str, object] | None = None,
        error: str | None = None,
        links: tuple[tuple[str, str], ...] = (),
    ) -> str:
        """Adds a span starting `start_ms` after T0; returns its span id."""
        span_id = f"{next(self._ids):016x}"
        span: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": span_id,
            "name": name,
            "kind": kind,
            "startTimeUnixNano": str(T0_NS + int(start_ms * 1e6)),
            "endTimeUnixNano": str(T0_NS + int((start_ms + duration_ms) * 1e6)),
            "attributes": [attribute(k, v) for k, v in (attrs or {}).items()],
            "status": {"code": "STATUS_CODE_ERROR", "message": error} if error is not None else {},
        }
        if parent:
            span["parentSpanId"] = parent
        if links:
            span["links"] = [{"traceId": t, "spanId": s} for t, s in links]
        self._batches[service, trace_id].append(span)
        return span_id

    def requests(self) -> list[dict[str, Any]]:
        return [
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": [attribute("service.name", service)]},
                        "scopeSpans": [{"scope": {"name": "renderflow"}, "spans": spans}],
                    }
                ]
            }
            for (service, _), spans in self._batches.items()
        ]

    def lines(self) -> list[str]:
        return [json.dumps(request, separators=(",", ":")) for request in self.requests()]

    def write(self, path: Path, extra: tuple[str, ...] = ()) -> Path:
        path.write_text("\n".join([*self.lines(), *extra]) + "\n")
        return path


def renders_scenario() -> Otlp:
    """Ten `POST /v1/renders` submissions (i = 0..9, one a second), six background jobs linked to
    them, three `GET /v1/renders/<uuid>` without a route template, and one orphan span.

    - auth: 3 ms, but 150 ms for i=9; validation 2 ms; db 20 ms, but 250 ms for i=8.
    - i=6 answers 422 after validation; i=7 answers 503: the Submit call fails UNAVAILABLE.
    - jobs for i=0..5 (kind image for even i, video for odd), each linked to the Submit server
      span: queue_wait 100 ms; image_fetch for odd i (2500 ms for i=1, else 300); generation 1000
      (image), 3000 (video), 8000 for i=3, 800 and failing `backend_timeout` for i=5; store
      200 ms, 1500 ms for i=4.
    """
    otlp = Otlp()
    for i, post_ms in enumerate(POST_MS):
        start = i * 1000.0
        trace = otlp.new_trace(f"submit{i}")
        status = {6: 422, 7: 503}.get(i, 202)
        root = otlp.span(
            "gateway", trace, "POST /v1/renders", start, post_ms, kind="SPAN_KIND_SERVER",
            attrs={"http.request.method": "POST", "http.route": "/v1/renders",
                   "url.path": "/v1/renders", "http.response.status_code": status},
            error="" if status == 503 else None,
        )  # fmt: skip
        cursor = start + 1
        for phase, ms in (("auth", 150 if i == 9 else 3), ("validation", 2), ("db", 250 if i == 8 else 20)):
            if phase == "db" and i == 6:
                break
            otlp.span("gateway", trace, phase, cursor, ms, root, attrs={"renderflow.phase": phase})
            cursor += ms + 1
        if i == 6:
            continue
        rpc = {"rpc.system": "grpc", "rpc.service": "renderflow.v1.GenerationService", "rpc.method": "Submit"}
        client = otlp.span(
            "gateway", trace, SUBMIT, cursor, 20, root, kind="SPAN_KIND_CLIENT",
            attrs={**rpc, "rpc.grpc.status_code": 14 if i == 7 else 0},
            error="failed to connect to all addresses" if i == 7 else None,
        )  # fmt: skip
        if i == 7:
            continue
        server = otlp.span(
            "generation", trace, SUBMIT, cursor + 1, 18, client, kind="SPAN_KIND_SERVER",
            attrs={**rpc, "rpc.grpc.status_code": 0},
        )  # fmt: skip
        otlp.span("generation", trace, "enqueue", cursor + 5, 5, server)
        if i <= 5:
            _job(otlp, i, (trace, server), cursor + 10)
    for n, (ms, status) in enumerate(((5, 200), (7, 200), (9, 404))):
        trace = otlp.new_trace(f"get{n}")
        path = f"/v1/renders/{uuid.UUID(int=n + 1)}"
        otlp.span(
            "gateway", trace, "GET", 20_000 + n * 100, ms, kind="SPAN_KIND_SERVER",
            attrs={"http.method": "GET", "http.target": path + "?wait=1", "http.status_code": status},
        )  # fmt: skip
    otlp.span("metadata", otlp.new_trace("orphan"), "SELECT", 21_000, 4, parent="00000000000000ff")
    return otlp


def _job(otlp: Otlp, i: int, submitted: tuple[str, str], created_ms: float) -> None:
    trace = otlp.new_trace(f"job{i}")
    kind = "image" if i % 2 == 0 else "video"
    claimed = created_ms + 100
    fetch_ms = (2500 if i == 1 else 300) if i % 2 else 0
    generation_ms = {3: 8000, 5: 800}.get(i, 1000 if kind == "image" else 3000)
    store_ms = 0 if i == 5 else (1500 if i == 4 else 200)
    render = otlp.span(
        "generation-worker", trace, "render", claimed, fetch_ms + generation_ms + store_ms + 1,
        kind="SPAN_KIND_CONSUMER", links=(submitted,),
        attrs={"render.id": str(uuid.UUID(int=100 + i)), "render.kind": kind, "render.attempt": 1},
        error="generation_failed" if i == 5 else None,
    )  # fmt: skip
    otlp.span("generation-worker", trace, "queue_wait", created_ms, 100, render)
    cursor = claimed
    if fetch_ms:
        otlp.span("generation-worker", trace, "image_fetch", cursor, fetch_ms, render)
        cursor += fetch_ms
    otlp.span(
        "generation-worker", trace, "generation", cursor, generation_ms, render,
        attrs={"failure.reason": "backend_timeout"} if i == 5 else {"backend": "procedural"},
        error="the backend did not answer in time" if i == 5 else None,
    )  # fmt: skip
    if store_ms:
        otlp.span("generation-worker", trace, "store", cursor + generation_ms, store_ms, render)


def test_fixture_lines_are_otlp_export_requests() -> None:
    for request in renders_scenario().requests():
        for resource_spans in request["resourceSpans"]:
            for span in resource_spans["scopeSpans"][0]["spans"]:
                # The protobuf JSON mapping wants bytes in base64: convert the hex ids to check.
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        link[key] = base64.b64encode(bytes.fromhex(link[key])).decode()
        message = ParseDict(request, ExportTraceServiceRequest())
        assert message.resource_spans[0].scope_spans[0].spans
