"""The telemetry bootstrap's choices from the `OTEL_*` and `RENDERFLOW_*` variables, the span file
the trace report reads, JSON log lines with trace ids and the slow-operation warning, how failures
mark spans, and the Prometheus exposition."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, StatusCode, TraceFlags
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from shared.errors import NotFound, Unavailable
from shared.logs import SLOW_LOGS_PER_S, JsonFormatter, LogThrottle, log_slow_operation
from shared.metrics import build_meter_provider, exposition
from shared.settings import ConfigError, Env
from shared.telemetry import (
    Budgets,
    FollowLinks,
    JsonLinesSpanExporter,
    _without_secrets,
    record_failure,
    setup_telemetry,
    span_exporter,
)
from tools.tracereport.model import ReadCounts, read_spans


def test_budgets_default_to_the_design_and_come_from_the_environment() -> None:
    budgets = Budgets.from_env(Env({}))
    assert (budgets.of("auth"), budgets.of("db"), budgets.of("image_fetch")) == (100, 200, 2000)
    assert budgets.of("generation") is None and budgets.of("queue_wait") is None
    assert budgets.of("no_such_phase") is None
    tuned = Budgets.from_env(
        Env(
            {
                "RENDERFLOW_BUDGET_DB_MS": "250",
                "RENDERFLOW_BUDGET_GENERATION_MS": "30000",
                "RENDERFLOW_BUDGET_STORE_MS": "0",
            }
        )
    )
    assert tuned.of("db") == 250 and tuned.of("generation") == 30000 and tuned.of("store") is None
    with pytest.raises(ConfigError, match="RENDERFLOW_BUDGET_AUTH_MS"):
        Budgets.from_env(Env({"RENDERFLOW_BUDGET_AUTH_MS": "fast"}))


def test_spans_go_to_a_file_unless_a_collector_is_configured(tmp_path: Path) -> None:
    exporter = span_exporter(Env({}), tmp_path)
    assert isinstance(exporter, JsonLinesSpanExporter)
    exporter.shutdown()
    assert (tmp_path / "traces.jsonl").exists()
    assert span_exporter(Env({"OTEL_TRACES_EXPORTER": "none"}), tmp_path) is None

    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    for env, kind in (
        (endpoint, GrpcExporter),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, GrpcExporter),
        ({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, HttpExporter),
        (
            {
                **endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            HttpExporter,
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, GrpcExporter),
    ):
        chosen = span_exporter(Env(env), tmp_path)
        assert isinstance(chosen, kind), env
        chosen.shutdown()
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        span_exporter(Env({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}), tmp_path)
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        span_exporter(Env({"OTEL_TRACES_EXPORTER": "zipkin"}), tmp_path)


def test_the_sdk_disabled_installs_nothing(tmp_path: Path) -> None:
    telemetry = setup_telemetry("quiet", Env({"OTEL_SDK_DISABLED": "true"}), tmp_path, metrics_port=9)
    assert telemetry.tracer_provider is None and telemetry.meter_provider is None
    assert telemetry.metrics_server is None
    telemetry.shutdown()
    assert not (tmp_path / "traces.jsonl").exists()


def test_the_span_file_reads_back_with_hex_ids_and_links(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    tracer = provider.get_tracer("unit")
    with tracer.start_as_current_span("request") as request, tracer.start_as_current_span("db"):
        pass
    with tracer.start_as_current_span("render", links=[Link(request.get_span_context())]) as job:
        job.set_attribute("render.id", "r1")
    provider.shutdown()

    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["resourceSpans"] for line in lines)
    counts = ReadCounts()
    spans = {span.name: span for span in read_spans([path], counts)}
    assert counts.bad_lines == 0 and spans.keys() == {"request", "db", "render"}
    context = request.get_span_context()
    assert spans["request"].trace_id == format(context.trace_id, "032x")
    assert spans["db"].parent_id == format(context.span_id, "016x")
    assert spans["render"].links[0].span_id == spans["request"].span_id
    assert spans["render"].service == "unit" and spans["render"].attributes["render.id"] == "r1"


# A process exporting argv[3] spans, one line each, to the span file argv[1] rotating at argv[2]
# bytes; it says `ready` and waits for a line on stdin, so that the writers run at the same time.


def test_the_span_file_keeps_its_newest_backups_as_the_settings_say(tmp_path: Path) -> None:
    env = Env({"RENDERFLOW_TRACES_MAX_BYTES": "4096", "RENDERFLOW_TRACES_BACKUPS": "2"})
    exporter = span_exporter(env, tmp_path)
    assert isinstance(exporter, JsonLinesSpanExporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("unit")
    for n in range(200):
        with tracer.start_as_current_span(f"span-{n}"):
            pass
    provider.shutdown()
    names = ["traces.jsonl.2", "traces.jsonl.1", "traces.jsonl"]
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == sorted(names)
    spans = [span.name for span in read_spans([tmp_path / name for name in names], ReadCounts())]
    assert spans[-1] == "span-199" and 0 < len(spans) < 200
    assert spans == [f"span-{n}" for n in range(200 - len(spans), 200)]
    with pytest.raises(ConfigError, match="RENDERFLOW_TRACES_BACKUPS"):
        span_exporter(Env({"RENDERFLOW_TRACES_BACKUPS": "0"}), tmp_path)


def test_a_job_trace_is_kept_exactly_when_the_request_it_links_to_was() -> None:
    kept = SpanContext(0x1F, 0x2F, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    dropped = SpanContext(0x3F, 0x4F, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))

    def recorded(delegate: Sampler, links: list[Link]) -> bool:
        tracer = TracerProvider(sampler=FollowLinks(delegate)).get_tracer("test")
        with tracer.start_as_current_span("render", links=links) as span:
            return span.is_recording()

    assert recorded(ALWAYS_OFF, [Link(kept)])  # whatever the ratio
    assert not recorded(ALWAYS_ON, [Link(dropped)])
    assert recorded(ALWAYS_ON, [Link(dropped), Link(kept)])
    assert recorded(ALWAYS_ON, []) and not recorded(ALWAYS_OFF, [])  # no links: the ratio decides
    # Not a root: its parent decides, as the parent-based samplers have it.
    tracer = TracerProvider(sampler=FollowLinks(ParentBased(ALWAYS_OFF))).get_tracer("test")
    with (
        trace.use_span(NonRecordingSpan(kept)),
        tracer.start_as_current_span("child", links=[Link(dropped)]) as span,
    ):
        assert span.is_recording()


def test_a_slow_operation_is_one_json_line_with_the_breakdown_and_trace_ids() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("tests.slow")
    logger.addHandler(handler)
    tracer = TracerProvider().get_tracer("unit")
    try:
        with tracer.start_as_current_span("request") as span:
            timings = {"auth_ms": 0.25, "db_ms": 250.1234, "total_ms": 251.0}
            log_slow_operation(logger, "db", 250.1234, 200.0, timings, render_id="r1", batch_id=None)
    finally:
        logger.removeHandler(handler)
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "slow operation" and entry["level"] == "warning"
    assert entry["service"] == "gateway" and entry["render_id"] == "r1" and "batch_id" not in entry
    assert (entry["phase"], entry["duration_ms"], entry["budget_ms"]) == ("db", 250.123, 200.0)
    assert entry["timings"] == {"auth_ms": 0.25, "db_ms": 250.123, "total_ms": 251.0}
    context = span.get_span_context()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")


def test_slow_operation_warnings_are_throttled_per_phase_and_say_how_many_were_dropped() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("tests.slow.throttled")
    logger.addHandler(handler)
    try:
        for _ in range(50):  # an overloaded second: every request is slow
            log_slow_operation(logger, "enqueue", 80.0, 50.0, {"enqueue_ms": 80.0})
        log_slow_operation(logger, "auth", 150.0, 100.0, {"auth_ms": 150.0})  # another phase: its own budget
    finally:
        logger.removeHandler(handler)
    phases = [json.loads(line)["phase"] for line in out.getvalue().splitlines()]
    assert phases.count("enqueue") == SLOW_LOGS_PER_S and phases.count("auth") == 1

    now = [0.0]
    throttle = LogThrottle(2.0, clock=lambda: now[0])
    assert [throttle.admit("db") for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 0.5  # one line's worth of budget again
    assert throttle.admit("db") == 3 and throttle.admit("db") is None


def test_server_faults_fail_a_span_and_the_callers_mistakes_only_mark_it() -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("unit")
    for name, error in (
        ("missing", NotFound("no such render")),
        ("down", Unavailable("metadata is down")),
        ("bug", KeyError("x")),
        ("too_large", web.HTTPRequestEntityTooLarge(max_size=1, actual_size=2)),
    ):
        with tracer.start_as_current_span(name) as span:
            record_failure(span, error)
    done = {span.name: span for span in spans.get_finished_spans()}
    assert done["missing"].status.status_code == StatusCode.UNSET
    assert dict(done["missing"].attributes or {}) == {"error.code": "not_found"}
    assert done["down"].status.status_code == StatusCode.ERROR
    assert (done["down"].attributes or {})["error.code"] == "unavailable"
    assert done["bug"].status.status_code == StatusCode.ERROR
    assert [event.name for event in done["bug"].events] == ["exception"]
    assert done["too_large"].status.status_code == StatusCode.UNSET and not done["too_large"].events


def test_client_spans_never_carry_secrets_of_urls() -> None:
    url = URL("https://user:secret@cdn.example/a/b.png?X-Amz-Signature=abc#frag")
    assert _without_secrets(url) == "https://cdn.example/a/b.png"


def test_metrics_are_exposed_as_prometheus_text_or_openmetrics() -> None:
    registry = CollectorRegistry()
    provider = build_meter_provider(Resource.create({"service.name": "unit"}), registry)
    meter = provider.get_meter("unit")
    meter.create_counter("renderflow.things", unit="{thing}").add(3, {"kind": "image"})
    meter.create_histogram("renderflow.wait", unit="s").record(0.25)
    try:
        body, content_type = exposition(None, registry)
        assert content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        [sample] = families["renderflow_things"].samples
        assert sample.name == "renderflow_things_total" and sample.labels == {"kind": "image"}
        assert sample.value == 3
        assert families["renderflow_wait_seconds"].type == "histogram"
        _, negotiated = exposition("application/openmetrics-text; version=1.0.0", registry)
        assert negotiated.startswith("application/openmetrics-text")
    finally:
        provider.shutdown()
