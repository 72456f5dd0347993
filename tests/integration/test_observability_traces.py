"""Traces through the real stack, in this process: one render submission is one trace from the
gateway's HTTP span down to PostgreSQL, its job is a trace of its own linked to it, every phase is a
span with plausible times, failures carry their reason, slow phases log their breakdown, and the
trace report over the exported spans counts right."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from services.generation.store import MIGRATIONS, SCHEMA
from shared.contract import phase_attribute
from shared.db import migrate
from shared.spans import STREAM_ATTRIBUTE
from shared.statements import SCOPE as SQL_SCOPE
from shared.telemetry import JsonLinesSpanExporter
from tests.support.observed_stack import TINY_MS, ObservedStack, Recorder, job_id
from tools.tracereport.cli import main as trace_report
from tools.tracereport.model import ReadCounts
from tools.tracereport.report import build_report
from tools.tracereport.selection import Filters, load_spans

JOB_PHASES = ("queue_wait", "image_fetch", "generation", "store")


@dataclass
class Scenario:
    """Renders submitted through the gateway, by what should become of them."""

    plain: str
    referenced: str
    cached: str
    missing_required: str
    missing_optional: str
    unknown_project_status: int
    ids: list[str] = field(default_factory=list)


async def run_scenario(stack: ObservedStack) -> Scenario:
    """A plain render, one with a reference, one with the same reference (then cached), one whose
    required reference is a 404 (fails), one whose optional reference is a 404 (goes on without),
    and a submit to an unknown project."""
    image = stack.origin.url("/image/observed")
    _, plain = await stack.submit(prompt="plain")
    _, referenced = await stack.submit(prompt="referenced", reference={"url": image})
    await stack.finished(referenced["id"])
    _, cached = await stack.submit(prompt="cached", reference={"url": image})
    _, required = await stack.submit(
        prompt="required", reference={"url": stack.origin.url("/status/404?n=1"), "required": True}
    )
    _, optional = await stack.submit(
        prompt="optional", reference={"url": stack.origin.url("/status/404?n=2")}
    )
    unknown, _ = await stack.submit(project="nowhere", prompt="lost")
    scenario = Scenario(plain["id"], referenced["id"], cached["id"], required["id"], optional["id"], unknown)
    scenario.ids = [plain["id"], referenced["id"], cached["id"], required["id"], optional["id"]]
    await stack.finished(*scenario.ids)
    return scenario


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def the_one(spans: Sequence[ReadableSpan], **match: Any) -> ReadableSpan:
    """The only span with the given name (and attributes: dots spelt `__`)."""
    name = match.pop("name")
    wanted = {key.replace("__", "."): value for key, value in match.items()}
    found = [s for s in spans if s.name == name and wanted.items() <= dict(attrs(s)).items()]
    assert len(found) == 1, (name, wanted, len(found))
    return found[0]


def in_trace(spans: Sequence[ReadableSpan], span: ReadableSpan) -> list[ReadableSpan]:
    assert span.context is not None
    return [s for s in spans if s.context is not None and s.context.trace_id == span.context.trace_id]


def ancestors(span: ReadableSpan, trace_spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    by_id = {s.context.span_id: s for s in trace_spans if s.context is not None}
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    assert span.end_time >= span.start_time, span.name
    return span.start_time, span.end_time


def duration_ms(span: ReadableSpan) -> float:
    start, end = times(span)
    return (end - start) / 1e6


async def test_a_submission_is_one_trace_down_to_sql_and_its_job_a_linked_trace(
    observed: ObservedStack,
) -> None:
    scenario = await run_scenario(observed)
    spans = list(observed.recorder.spans)
    # No statement is a trace of its own: polls, pings and housekeeping are not worth one each.
    roots = [s for s in spans if s.parent is None]
    lone = [s.name for s in roots if getattr(s.instrumentation_scope, "name", "") == SQL_SCOPE]
    assert not lone, lone

    resolved = 0
    for render_id in scenario.ids:
        request = the_one(spans, name="POST /v1/renders", render__id=render_id)
        assert request.kind == SpanKind.SERVER and request.parent is None
        assert {"render.project": "obs", "render.kind": "image"}.items() <= dict(attrs(request)).items()
        assert attrs(request)["render.tenant"]
        submission = in_trace(spans, request)
        # One tree: every span of the trace hangs under the gateway's request span.
        assert all(request in ancestors(s, submission) for s in submission if s is not request)
        # The request's own phases are attributes of its span, each no longer than the request.
        timed = {
            name: attrs(request).get(phase_attribute(name)) for name in ("auth", "validation", "enqueue")
        }
        assert all(isinstance(ms, float) and 0 <= ms <= duration_ms(request) for ms in timed.values()), timed
        sql = [s for s in submission if s.instrumentation_scope and s.instrumentation_scope.name == SQL_SCOPE]
        # A call that succeeded is its server's span alone, right under the request's.
        [submit] = [s for s in submission if s.name.endswith("GenerationService/Submit")]
        assert submit.kind == SpanKind.SERVER and attrs(submit)["rpc.grpc.status_code"] == 0
        assert submit.parent is not None and submit.parent.span_id == request.context.span_id
        enqueue_ms = timed["enqueue"]
        assert isinstance(enqueue_ms, float) and duration_ms(submit) <= enqueue_ms
        assert isinstance(attrs(submit).get(phase_attribute("db")), float)
        assert any(submit in ancestors(s, submission) for s in sql), "no SQL under Submit"
        # Generation reads the project from metadata, when it has not cached it, within its Submit.
        for resolve in [s for s in submission if s.name.endswith("MetadataService/ResolveRender")]:
            assert submit in ancestors(resolve, submission)
            if resolve.kind == SpanKind.SERVER:
                resolved += 1
                assert any(resolve in ancestors(s, submission) for s in sql), "no SQL under ResolveRender"

        job = the_one(spans, name="render", render__id=render_id)
        assert job.kind == SpanKind.CONSUMER and job.context is not None
        assert job.context.trace_id != request.context.trace_id
        assert [(link.context.trace_id, link.context.span_id) for link in job.links] == [
            (request.context.trace_id, request.context.span_id)
        ]
        assert attrs(job)["render.attempt"] == 1 and attrs(job)["render.backend"]
        assert attrs(job)["render.project"] == "obs"
        assert attrs(job)["render.tenant"] == attrs(request)["render.tenant"]
        work = in_trace(spans, job)
        steps = {s.name: s for s in work if s.parent and s.parent.span_id == job.context.span_id}
        order = [name for name in JOB_PHASES if name in steps]
        edges = [times(steps[name]) for name in order]
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(edges))
        assert times(steps["queue_wait"])[0] >= times(request)[0]  # created during the submit
        assert any(s.instrumentation_scope and s.instrumentation_scope.name == SQL_SCOPE for s in work)

    assert resolved >= 1  # the first submit, at least, found nothing cached

    def job_steps(render_id: str) -> dict[str, ReadableSpan]:
        job = the_one(spans, name="render", render__id=render_id)
        assert job.context is not None
        children = [s for s in in_trace(spans, job) if s.parent and s.parent.span_id == job.context.span_id]
        return {s.name: s for s in children if s.name in JOB_PHASES}

    assert job_steps(scenario.plain).keys() == {"queue_wait", "generation", "store"}
    assert attrs(job_steps(scenario.referenced)["image_fetch"])["imagefetch.cache_hit"] is False
    assert attrs(job_steps(scenario.cached)["image_fetch"])["imagefetch.cache_hit"] is True

    failed = the_one(spans, name="render", render__id=scenario.missing_required)
    assert failed.status.status_code == StatusCode.ERROR
    assert attrs(failed)["failure.reason"] == "http_404"
    assert attrs(failed)["error.code"] == "reference_fetch_failed"
    assert job_steps(scenario.missing_required).keys() == {"queue_wait", "image_fetch"}
    went_on = the_one(spans, name="render", render__id=scenario.missing_optional)
    assert went_on.status.status_code != StatusCode.ERROR
    for render_id in (scenario.missing_required, scenario.missing_optional):
        fetch = job_steps(render_id)["image_fetch"]
        assert fetch.status.status_code == StatusCode.ERROR and attrs(fetch)["failure.reason"] == "http_404"
        origin_calls = [
            s for s in in_trace(spans, fetch) if s.kind == SpanKind.CLIENT and s.name == "GET"
        ]  # the image-fetch service's request to the origin
        assert [attrs(s).get("http.status_code") for s in origin_calls] == [404]
    assert scenario.unknown_project_status == 404


async def test_event_streams_are_marked_as_streams_and_requests_are_not(observed: ObservedStack) -> None:
    _, render = await observed.submit(prompt="listened to")
    url = f"{observed.base}/v1/renders/{render['id']}/events"
    async with observed.http.get(url, headers=observed.headers) as stream:
        assert stream.status == 200
        await stream.read()  # the stream ends after the render's last event

    def done(spans: Sequence[ReadableSpan]) -> bool:
        return any(s.name == "GET /v1/renders/{id}/events" for s in spans)

    await observed.recorder.wait_for(done)
    spans = list(observed.recorder.spans)
    request = the_one(spans, name="GET /v1/renders/{id}/events", render__id=render["id"])
    assert attrs(request)[STREAM_ATTRIBUTE] is True
    served = [s for s in spans if s.kind == SpanKind.SERVER and attrs(s).get("rpc.system") == "grpc"]
    streamed = {s.name for s in served if attrs(s).get(STREAM_ATTRIBUTE)}
    assert "/renderflow.v1.GenerationService/Watch" in streamed  # server-streaming RPCs
    assert "/renderflow.v1.GenerationService/Submit" not in streamed  # unary ones
    submit = the_one(spans, name="POST /v1/renders", render__id=render["id"])
    assert STREAM_ATTRIBUTE not in attrs(submit)


async def test_a_services_migrations_are_one_trace(database_url: str, recorder: Recorder) -> None:
    recorder.spans.clear()
    applied = await migrate(database_url, SCHEMA, MIGRATIONS)
    [root] = [s for s in recorder.spans if s.parent is None]
    assert root.name == "migrate" and attrs(root)["db.schema"] == SCHEMA
    assert attrs(root)["db.migrations_applied"] == len(applied) > 0
    assert len(recorder.spans) > len(applied)  # its statements, under it


async def test_slow_phases_log_one_warning_with_the_whole_breakdown(observed: ObservedStack) -> None:
    _, render = await observed.submit(prompt="slow")
    await observed.finished(render["id"])
    warnings = observed.slow_operations()
    request = the_one(observed.recorder.spans, name="POST /v1/renders", render__id=render["id"])
    job = the_one(observed.recorder.spans, name="render", render__id=render["id"])
    by_phase = {w["phase"]: w for w in warnings if w.get("render_id") == render["id"]}
    assert by_phase.keys() == {"enqueue", "store"}
    enqueue, store = by_phase["enqueue"], by_phase["store"]
    assert enqueue["level"] == "warning" and enqueue["budget_ms"] == TINY_MS
    assert enqueue["duration_ms"] > TINY_MS
    assert {"auth_ms", "validation_ms", "enqueue_ms", "total_ms"} <= enqueue["timings"].keys()
    assert enqueue["trace_id"] == format(request.context.trace_id, "032x")
    assert {"queue_wait_ms", "generation_ms", "store_ms"} <= store["timings"].keys()
    assert job.context is not None and store["trace_id"] == format(job.context.trace_id, "032x")
    assert store["kind"] == "image" and store["worker_host"]  # what an SRE acts on, on the job's line


async def test_the_trace_report_over_the_exported_spans(
    observed: ObservedStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = await run_scenario(observed)
    path = tmp_path / "traces.jsonl"
    exporter = JsonLinesSpanExporter(path)
    exporter.export(observed.recorder.spans)
    exporter.shutdown()

    counts = ReadCounts()
    report = build_report(load_spans([path], Filters(), counts), counts)

    assert counts.bad_lines == 0 and counts.spans == len(observed.recorder.spans)
    endpoints = {(e.endpoint.side, e.endpoint.name): e for e in report.endpoints}
    submits = endpoints["server", "POST /v1/renders"]
    assert submits.summary.count == 6 and submits.errors == 0
    assert submits.client_errors == 1 and submits.client_error_rate == pytest.approx(1 / 6)
    # The unknown project's submit reached generation too, which refused it (NOT_FOUND).
    assert endpoints["server", "GenerationService/Submit"].summary.count == 6
    assert endpoints["server", "ImageFetchService/Fetch"].summary.count >= 4
    phases = {p.phase: p.summary.count for p in report.phases}
    assert phases["enqueue"] == 6 and phases["queue_wait"] == 5 and phases["image_fetch"] == 4
    assert phases["generation (image)"] == 4 and phases["store"] == 4
    assert phases["auth"] >= 6 and phases["validation"] >= 6
    assert all(p.summary.p50_ms >= 0 and p.summary.max_ms >= p.summary.p50_ms for p in report.phases)
    causes = {(c.span_name, c.cause): c for c in report.errors}
    # The origin's 404, counted where it began (imagefetch's request to the origin), not again at
    # each span it passed through on its way up to the render.
    origin = causes[("GET", "HTTP 404")]
    assert origin.count == 2 and origin.passed_through >= 2 * 3, origin
    assert ("render", "http_404") not in causes and ("imagefetch.fetch", "http_404") not in causes
    assert scenario.missing_required in {job_id(s) for s in observed.recorder.spans if s.name == "render"}

    # One render, span by span: its submit and its job (linked), and where it failed.
    code = trace_report([str(path), "--render", scenario.missing_required])
    shown = capsys.readouterr().out
    assert code == 0
    assert "POST /v1/renders" in shown and "↪ render" in shown and "image_fetch" in shown
    [began] = [line for line in shown.splitlines() if line.startswith("failed at")]
    assert began.startswith("failed at GET (") and ": HTTP 404, passed on by" in began  # the origin's answer
