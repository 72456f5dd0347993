"""The trace report's figures: endpoints, phases against budgets, waterfalls following links, error
causes, filters; and the text report and command line that show them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.contract import PHASE_BUDGETS_MS
from shared.spans import STREAM_ATTRIBUTE
from tests.unit.test_tracereport_otlp import T0, Otlp, renders_scenario
from tools.tracereport.cli import main
from tools.tracereport.model import ReadCounts
from tools.tracereport.report import Report, build_report
from tools.tracereport.selection import Filters, load_spans, parse_since
from tools.tracereport.stats import percentile
from tools.tracereport.text import render_text


@pytest.fixture
def scenario(tmp_path: Path) -> tuple[Otlp, Path]:
    otlp = renders_scenario()
    return otlp, otlp.write(tmp_path / "traces.jsonl")


def report_of(path: Path, filters: Filters | None = None, **options: object) -> Report:
    counts, filters = ReadCounts(), filters or Filters()
    return build_report(load_spans([path], filters, counts), counts, filters, **options)  # type: ignore[arg-type]


def test_percentiles_interpolate_between_the_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 95, 99, 100)] == pytest.approx([50.5, 95.05, 99.01, 100])
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) == 0.0


def test_endpoints_have_counts_error_rates_and_percentiles(scenario: tuple[Otlp, Path]) -> None:
    report = report_of(scenario[1])

    rows = {(s.endpoint.protocol, s.endpoint.side, s.endpoint.name): s for s in report.endpoints}
    assert list(rows) == [
        ("http", "server", "POST /v1/renders"),
        ("http", "server", "GET /v1/renders/{id}"),  # no route template: the path, ids collapsed
        ("grpc", "server", "GenerationService/Submit"),
        ("grpc", "client", "GenerationService/Submit"),
    ]
    post = rows["http", "server", "POST /v1/renders"]
    assert (post.summary.count, post.errors, post.client_errors) == (10, 1, 1)
    assert (post.error_rate, post.client_error_rate) == (0.1, 0.1)
    figures = (post.summary.avg_ms, post.summary.p50_ms, post.summary.p95_ms, post.summary.p99_ms)
    assert figures == pytest.approx((102.8, 64.5, 264.0, 292.8))
    assert post.summary.max_ms == 300
    assert sum(b.count for b in post.summary.histogram) == 10
    get = rows["http", "server", "GET /v1/renders/{id}"]
    assert (get.summary.count, get.errors, get.client_errors) == (3, 0, 1)
    client = rows["grpc", "client", "GenerationService/Submit"]
    assert (client.summary.count, client.errors) == (9, 1)
    assert rows["grpc", "server", "GenerationService/Submit"].errors == 0


def test_phases_are_measured_against_their_budgets(scenario: tuple[Otlp, Path]) -> None:
    report = report_of(scenario[1])

    phases = {p.phase: p for p in report.phases}
    assert list(phases) == [
        "auth", "validation", "db", "enqueue", "queue_wait", "image_fetch",
        "generation (image)", "generation (video)", "store",
    ]  # fmt: skip
    counts = {name: p.summary.count for name, p in phases.items()}
    assert counts == {
        "auth": 10, "validation": 10, "db": 9, "enqueue": 8, "queue_wait": 6, "image_fetch": 3,
        "generation (image)": 3, "generation (video)": 3, "store": 5,
    }  # fmt: skip
    marked = {name for name, p in phases.items() if p.p95_over_budget}
    assert marked == {"image_fetch", "store"}
    over = {name: p.over_budget for name, p in phases.items() if p.over_budget}
    assert over == {"auth": 1, "db": 1, "image_fetch": 1, "store": 1}
    assert phases["store"].summary.p95_ms == pytest.approx(1240)
    assert phases["image_fetch"].summary.p95_ms == pytest.approx(2280)
    assert phases["queue_wait"].budget_ms is None
    assert phases["generation (video)"].summary.max_ms == 8000


def test_budgets_can_be_overridden(scenario: tuple[Otlp, Path]) -> None:
    budgets = {**PHASE_BUDGETS_MS, "auth": 50, "generation": 5000}

    phases = {p.phase: p for p in report_of(scenario[1], budgets=budgets).phases}

    assert phases["auth"].p95_over_budget
    video = phases["generation (video)"]
    assert (video.budget_ms, video.over_budget, video.p95_over_budget) == (5000, 1, True)
    assert not phases["generation (image)"].p95_over_budget


def test_slowest_traces_are_waterfalls_that_follow_links_to_the_job(scenario: tuple[Otlp, Path]) -> None:
    otlp, path = scenario

    slowest = report_of(path, top=2).slowest

    first, second = slowest
    assert first.trace_ids == (otlp.traces["submit3"], otlp.traces["job3"])
    assert first.duration_ms == pytest.approx(8640)
    assert second.trace_ids == (otlp.traces["submit1"], otlp.traces["job1"])
    assert [(r.depth, r.name, r.service, r.linked) for r in first.rows] == [
        (0, "POST /v1/renders", "gateway", False),
        (1, "auth", "gateway", False),
        (1, "validation", "gateway", False),
        (1, "db", "gateway", False),
        (1, "GenerationService/Submit", "gateway", False),
        (2, "GenerationService/Submit", "generation", False),
        (3, "enqueue", "generation", False),
        (3, "render", "generation-worker", True),
        (4, "queue_wait", "generation-worker", False),
        (4, "image_fetch", "generation-worker", False),
        (4, "generation", "generation-worker", False),
        (4, "store", "generation-worker", False),
    ]
    render = first.rows[7]
    assert render.trace_id == otlp.traces["job3"]
    assert render.offset_ms == pytest.approx(139)  # job created at +39, claimed 100 ms later


def test_streams_are_left_out_of_the_slowest_traces(tmp_path: Path) -> None:
    otlp = renders_scenario()
    server, client = "SPAN_KIND_SERVER", "SPAN_KIND_CLIENT"
    stream: dict[str, object] = {STREAM_ATTRIBUTE: True}
    sse = otlp.new_trace("sse")  # a client listening to a render's events for a minute
    http = {"http.method": "GET", "http.route": "/v1/renders/{id}/events", **stream}
    root = otlp.span("gateway", sse, "GET /v1/renders/{id}/events", 0, 60_000, kind=server, attrs=http)
    watch = "/renderflow.v1.GenerationService/Watch"
    otlp.span("generation", sse, watch, 1, 59_000, parent=root, kind=server, attrs=stream)
    feed = otlp.new_trace("feed")  # a subscription the gateway keeps open, its call the root
    changes = "/renderflow.v1.MetadataService/WatchChanges"
    call = otlp.span("gateway", feed, changes, 0, 90_000, kind=client)
    otlp.span("metadata", feed, changes, 1, 89_000, parent=call, kind=server, attrs=stream)

    report = report_of(otlp.write(tmp_path / "traces.jsonl"), top=1)

    [slowest] = report.slowest
    assert slowest.trace_ids == (otlp.traces["submit3"], otlp.traces["job3"])  # as without the streams
    assert report.streams == 2
    text = render_text(report)
    assert "Left out: 2 streams" in text
    assert {(s.endpoint.side, s.endpoint.name) for s in report.endpoints if s.stream} == {
        ("server", "GET /v1/renders/{id}/events"),
        ("server", "GenerationService/Watch"),
        ("server", "MetadataService/WatchChanges"),
        ("client", "MetadataService/WatchChanges"),  # the call to a stream is one too
    }
    [row] = [line for line in text.splitlines() if line.startswith("GET /v1/renders/{id}/events")]
    assert row.endswith("  stream")


def test_a_span_whose_parent_is_missing_is_a_root(scenario: tuple[Otlp, Path]) -> None:
    otlp, path = scenario

    slowest = report_of(path, top=100, max_rows=5).slowest

    [orphan] = [w for w in slowest if w.trace_id == otlp.traces["orphan"]]
    assert [(r.depth, r.name, r.service) for r in orphan.rows] == [(0, "SELECT", "metadata")]
    assert len(slowest) == 14  # 10 submissions (6 with their job linked in), 3 GETs, the orphan
    assert slowest[0].hidden == 12 - 5


def test_a_failure_counts_once_where_it_began(scenario: tuple[Otlp, Path]) -> None:
    otlp, path = scenario

    errors = report_of(path).errors

    # Submit's UNAVAILABLE made the route's 503, and the backend's timeout the render's failure:
    # one failure each, at the span where it began, the span above counted as passing it on.
    assert [(e.span_name, e.cause, e.count, e.passed_through, e.example_trace_id) for e in errors] == [
        ("GenerationService/Submit", "grpc UNAVAILABLE", 1, 1, otlp.traces["submit7"]),
        ("generation", "backend_timeout", 1, 1, otlp.traces["job5"]),
    ]
    assert errors[1].services == ["generation-worker"]


def test_route_filter_takes_a_glob_or_a_substring(scenario: tuple[Otlp, Path]) -> None:
    gets = report_of(scenario[1], Filters(route="GET *"))
    assert [s.endpoint.name for s in gets.endpoints] == ["GET /v1/renders/{id}"]
    assert (gets.trace_count, gets.phases) == (3, [])

    submits = report_of(scenario[1], Filters(route="Submit"))
    assert [(s.endpoint.side, s.summary.count) for s in submits.endpoints] == [("server", 8), ("client", 9)]
    assert submits.trace_count == 9 + 6  # the submissions that called Submit, and their jobs


def test_service_filter_keeps_traces_linked_to_the_services_traces(scenario: tuple[Otlp, Path]) -> None:
    report = report_of(scenario[1], Filters(services=("generation-worker",)))

    assert report.endpoints == []  # the worker serves no endpoint
    assert report.trace_count == 6 + 6  # the jobs and the submissions they link to
    assert {p.phase: p.summary.count for p in report.phases}["auth"] == 6


def test_since_filter_leaves_out_older_spans(scenario: tuple[Otlp, Path]) -> None:
    report = report_of(scenario[1], Filters(since=T0 + timedelta(seconds=5)))

    [post] = [s for s in report.endpoints if s.endpoint.name == "POST /v1/renders"]
    assert post.summary.count == 5


def test_since_is_a_time_or_a_duration_back_from_now() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("15m", now) == now - timedelta(minutes=15)
    assert parse_since("1h30m", now) == now - timedelta(minutes=90)
    assert parse_since("2024-05-01T11:00:00Z", now) == now - timedelta(hours=1)
    assert parse_since("2024-05-01T13:00:00+02:00", now) == now - timedelta(hours=1)
    for bad in ("2024-05-01T11:00:00", "soon", "15x"):
        with pytest.raises(ValueError):
            parse_since(bad, now)


def test_text_report_fits_a_100_column_terminal(scenario: tuple[Otlp, Path]) -> None:
    text = render_text(report_of(scenario[1]))

    assert max(len(line) for line in text.splitlines()) <= 100
    lines = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert lines["image_fetch"].endswith("P95 OVER")
    assert lines["store"].endswith("P95 OVER")
    assert "OVER" not in lines["auth"]
    assert "POST /v1/renders                           10  10.0%  10.0%   102.8    64.5   264.0" in text
    assert "↪ render" in text
    assert "backend_timeout" in text


def test_terminal_escapes_in_span_names_are_neutralised(tmp_path: Path) -> None:
    otlp = Otlp()
    otlp.span("gateway", otlp.new_trace(), "evil\x1b[2J\x1b[31mname", 0, 5, error="\x1b]0;title\x07")

    text = render_text(report_of(otlp.write(tmp_path / "evil.jsonl")))

    assert "\x1b" not in text and "\x07" not in text
    assert "evil?[2J?[31mname" in text


def test_command_line_reads_directories_and_globs_and_writes_json_and_html(
    scenario: tuple[Otlp, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    otlp = scenario[0]
    (tmp_path / "notes.txt").write_text("not spans")
    out_json, out_html = tmp_path / "report.json", tmp_path / "report.html"

    code = main([str(tmp_path), str(tmp_path / "*.jsonl"), "--top", "1", "--budget", "auth=50",
                 "--json", str(out_json), "--html", str(out_html)])  # fmt: skip

    assert code == 0
    assert capsys.readouterr().out.startswith("TRACE REPORT  20 traces, 94 spans")
    summary = json.loads(out_json.read_text())
    assert summary["inputs"]["files"] == 1  # the directory and the glob name the same file
    assert (summary["spans"], summary["traces"], summary["budgets_ms"]["auth"]) == (94, 20, 50)
    post = summary["endpoints"][0]
    assert (post["name"], post["count"], post["p95_ms"], post["error_rate"]) == (
        "POST /v1/renders",
        10,
        264.0,
        0.1,
    )
    [slowest] = summary["slowest"]
    assert slowest["trace_ids"] == [otlp.traces["submit3"], otlp.traces["job3"]]
    assert out_html.read_text().startswith("<!DOCTYPE html>")


def test_command_line_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [str(tmp_path / "missing.jsonl")],
        [str(tmp_path), "--budget", "auth"],
        [str(tmp_path), "--since", "x"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_spans_in_a_parent_cycle_are_each_shown_once(tmp_path: Path) -> None:
    otlp = Otlp()
    trace = otlp.new_trace()
    # Ids are handed out in order: the first span's parent is the second, and the other way round.
    otlp.span("gateway", trace, "a", 0, 10, parent=f"{int(trace, 16) + 2:016x}")
    otlp.span("gateway", trace, "b", 1, 5, parent=f"{int(trace, 16) + 1:016x}")

    [waterfall] = report_of(otlp.write(tmp_path / "cycle.jsonl")).slowest

    assert [(r.depth, r.name) for r in waterfall.rows] == [(0, "a"), (1, "b")]
