"""Reading spans: OTLP/JSON as Renderflow's exporter and a collector write it, garbage skipped."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link as OtelLink
from opentelemetry.trace import SpanKind

from shared.telemetry import JsonLinesSpanExporter
from tests.unit.test_tracereport_otlp import T0_NS, renders_scenario
from tools.tracereport.model import Link, ReadCounts, read_spans
from tools.tracereport.report import build_report
from tools.tracereport.text import render_text


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_collector_encoding_with_numeric_enums_and_base64_ids(tmp_path: Path) -> None:
    trace_id, span_id, parent_id = bytes(range(1, 17)), bytes(range(1, 9)), bytes(range(9, 17))
    span = {
        "traceId": b64(trace_id),
        "spanId": b64(span_id),
        "parentSpanId": b64(parent_id),
        "name": "/renderflow.v1.MetadataService/GetRender",
        "kind": 2,
        "startTimeUnixNano": T0_NS,
        "endTimeUnixNano": T0_NS + 2_500_000,
        "status": {"code": 2, "message": "no such render"},
        "attributes": [
            {"key": "rpc.grpc.status_code", "value": {"intValue": 5}},
            {"key": "ratio", "value": {"doubleValue": 0.5}},
            {"key": "cache.hit", "value": {"boolValue": True}},
            {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "2"}]}}},
        ],
        "events": [
            {
                "name": "exception",
                "attributes": [{"key": "exception.type", "value": {"stringValue": "KeyError"}}],
            }
        ],
        "links": [{"traceId": "ab" * 16, "spanId": "cd" * 8}],
    }
    request = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [span]}]}]}
    path = tmp_path / "collector.jsonl"
    path.write_text(json.dumps(request) + "\n")

    [parsed] = read_spans([path], ReadCounts())

    assert (parsed.trace_id, parsed.span_id, parsed.parent_id) == (
        trace_id.hex(),
        span_id.hex(),
        parent_id.hex(),
    )
    assert (parsed.kind, parsed.status, parsed.status_message) == ("server", "error", "no such render")
    assert parsed.service == "unknown"
    assert parsed.duration_ms == 2.5
    assert parsed.attributes == {"rpc.grpc.status_code": 5, "ratio": 0.5, "cache.hit": True, "tags": ("a", 2)}
    assert parsed.exception == "KeyError"
    assert parsed.links == (Link("ab" * 16, "cd" * 8),)


def test_garbage_lines_and_malformed_spans_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = renders_scenario().lines()
    no_trace_id = json.loads(lines[0])
    del no_trace_id["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
    path = tmp_path / "traces.jsonl"
    garbage = [
        lines[0][: len(lines[0]) // 2],
        "not json at all",
        '{"resourceSpans": 5}',
        "",
        json.dumps(no_trace_id),
    ]
    path.write_text("\n".join([*lines, *garbage]) + "\n")
    counts = ReadCounts()

    spans = list(read_spans([path], counts))

    assert counts.lines == len(lines) + 4
    assert (counts.bad_lines, counts.bad_spans) == (3, 1)
    assert counts.first_bad == f"{path}:{len(lines) + 1}"
    per_line = [len(json.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"]) for line in lines]
    assert len(spans) == counts.spans == sum(per_line) + per_line[0] - 1
    report = build_report(spans, counts)
    assert report.span_count == sum(per_line)  # the copy of the first line's spans counts once
    footer = " ".join(render_text(report).split("\n\n")[-1].split())
    assert "Skipped 3 unreadable lines" in footer
    assert "Skipped 1 malformed span." in footer


def test_a_file_written_by_the_real_exporter_is_read(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("test")
    http: dict[str, str | int] = {
        "http.request.method": "POST",
        "http.route": "/v1/renders",
        "http.response.status_code": 202,
    }
    with (
        tracer.start_as_current_span("POST /v1/renders", kind=SpanKind.SERVER, attributes=http) as request,
        tracer.start_as_current_span("auth", attributes={"renderflow.phase": "auth"}),
    ):
        pass
    job = {"render.kind": "video", "render.id": "r1"}
    links = [OtelLink(request.get_span_context())]
    with (
        tracer.start_as_current_span(
            "render", context=otel_context.Context(), kind=SpanKind.CONSUMER, links=links, attributes=job
        ),
        pytest.raises(TimeoutError),
        tracer.start_as_current_span("generation") as generation,
    ):
        generation.set_attribute("failure.reason", "backend_timeout")
        raise TimeoutError("the backend took too long")
    provider.shutdown()
    counts = ReadCounts()

    report = build_report(read_spans([path], counts), counts)

    assert (counts.lines, counts.bad_lines, report.span_count, report.trace_count) == (4, 0, 4, 2)
    [endpoint] = report.endpoints
    assert (endpoint.endpoint.name, endpoint.summary.count, endpoint.errors) == ("POST /v1/renders", 1, 0)
    assert [p.phase for p in report.phases] == ["auth", "generation (video)"]
    [waterfall] = report.slowest
    assert [(r.depth, r.name, r.linked) for r in waterfall.rows] == [
        (0, "POST /v1/renders", False),
        (1, "auth", False),
        (1, "render", True),
        (2, "generation", False),
    ]
    assert [(e.span_name, e.cause, e.count) for e in report.errors] == [("generation", "backend_timeout", 1)]
    assert "↪ render" in render_text(report)
