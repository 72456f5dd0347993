"""The report: every figure the text, HTML and JSON renderings show, computed once from the spans."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared.contract import PHASE_BUDGETS_MS
from tools.tracereport.model import ReadCounts, Span
from tools.tracereport.selection import Filters
from tools.tracereport.stats import (
    EndpointStats,
    ErrorCause,
    PhaseStats,
    Summary,
    endpoint_stats,
    error_causes,
    phase_stats,
)
from tools.tracereport.traces import TraceSet, Waterfall

MAX_WATERFALL_ROWS = 60


@dataclass(frozen=True)
class Report:
    """What the spans say, ready to render."""

    counts: ReadCounts
    filters: Filters
    budgets: Mapping[str, float]
    span_count: int
    trace_count: int
    start: datetime | None
    """When the first span started."""
    end: datetime | None
    """When the last span ended."""
    endpoints: list[EndpointStats] = field(default_factory=list)
    phases: list[PhaseStats] = field(default_factory=list)
    slowest: list[Waterfall] = field(default_factory=list)
    streams: int = 0
    """Groups of traces left out of `slowest` for being streams."""
    errors: list[ErrorCause] = field(default_factory=list)


def build_report(
    spans: Iterable[Span],
    counts: ReadCounts,
    filters: Filters | None = None,
    budgets: Mapping[str, float] = PHASE_BUDGETS_MS,
    top: int = 5,
    max_rows: int = MAX_WATERFALL_ROWS,
) -> Report:
    """The report over `spans`; the endpoint table lists only endpoints the filters ask for, the
    other sections cover every span given (the filtered traces and the traces linked to them)."""
    filters = filters or Filters()
    traces = TraceSet(spans)

    def kind_of(span: Span) -> str | None:
        kind = traces.inherited(span, "render.kind")
        return None if kind is None else str(kind)

    slowest, streams = traces.slowest(top, max_rows) if top > 0 else ([], 0)
    starts = [span.start_ns for span in traces]
    ends = [span.end_ns for span in traces]
    return Report(
        counts=counts,
        filters=filters,
        budgets=dict(budgets),
        span_count=len(traces),
        trace_count=len(traces.traces),
        start=_time(min(starts)) if starts else None,
        end=_time(max(ends)) if ends else None,
        endpoints=endpoint_stats(traces, keep=filters.matches),
        phases=phase_stats(traces, budgets, kind_of),
        slowest=slowest,
        streams=streams,
        errors=error_causes(traces),
    )


def report_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (milliseconds rounded to microseconds, times in RFC 3339)."""
    filters = report.filters
    return {
        "inputs": asdict(report.counts),
        "filters": {
            "since": filters.since.isoformat() if filters.since else None,
            "route": filters.route,
            "services": list(filters.services),
        },
        "budgets_ms": dict(report.budgets),
        "spans": report.span_count,
        "traces": report.trace_count,
        "start": report.start.isoformat() if report.start else None,
        "end": report.end.isoformat() if report.end else None,
        "endpoints": [
            {
                "protocol": s.endpoint.protocol,
                "side": s.endpoint.side,
                "name": s.endpoint.name,
                **_summary(s.summary),
                "errors": s.errors,
                "error_rate": round(s.error_rate, 6),
                "client_errors": s.client_errors,
                "client_error_rate": round(s.client_error_rate, 6),
                "stream": s.stream,
            }
            for s in report.endpoints
        ],
        "phases": [
            {
                "phase": p.phase,
                **_summary(p.summary),
                "budget_ms": p.budget_ms,
                "over_budget": p.over_budget,
                "p95_over_budget": p.p95_over_budget,
            }
            for p in report.phases
        ],
        "slowest": [_rounded(asdict(w)) for w in report.slowest],
        "streams_left_out": report.streams,
        "errors": [asdict(e) for e in report.errors],
    }


def _summary(summary: Summary) -> dict[str, Any]:
    figures: dict[str, Any] = _rounded(asdict(summary))
    for item in figures["histogram"]:
        if item["hi_ms"] == math.inf:
            item["hi_ms"] = None  # JSON has no infinity
    return figures


def _rounded(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, UTC)
