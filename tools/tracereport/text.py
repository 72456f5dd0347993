"""The report as plain text for a 100-column terminal: aligned tables and text waterfalls."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from tools.tracereport.model import ReadCounts
from tools.tracereport.report import Report
from tools.tracereport.stats import EndpointStats, Summary
from tools.tracereport.traces import Waterfall, WaterfallRow

WIDTH = 100
_BAR = 32
_SECTIONS = {
    ("http", "server"): ("HTTP ROUTES (ms)", "5xx", "4xx"),
    ("grpc", "server"): ("gRPC METHODS SERVED (ms)", "err", ""),
    ("grpc", "client"): ("gRPC CALLS MADE (ms)", "err", ""),
}


def render_text(report: Report) -> str:
    """The whole report: endpoints, phases, slowest traces, error causes, and what was read."""
    if not report.span_count:
        return f"No spans to report on.\n\n{_footer(report)}\n"
    parts = [_header(report), *_endpoints(report.endpoints), _phases(report)]
    parts += [waterfalls(report.slowest, report.streams), _errors(report), _footer(report)]
    return "\n\n".join(part for part in parts if part) + "\n"


def clean(text: str) -> str:
    """Span-provided text made safe for a terminal: control characters (escape sequences) become
    `?`."""
    return "".join(char if char.isprintable() else "?" for char in text)


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters (an ellipsis marks the cut) and padded to it."""
    text = clean(text)
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def ms(value: float, width: int = 7) -> str:
    """Milliseconds right-aligned in `width` columns (one decimal while it fits)."""
    text = f"{value:.1f}"
    return (text if len(text) <= width else f"{value:.0f}").rjust(width)


def _header(report: Report) -> str:
    lines = [f"TRACE REPORT  {report.trace_count:,} traces, {report.span_count:,} spans"]
    if report.start and report.end:
        lines[0] += f", {report.start:%Y-%m-%d %H:%M:%S} to {report.end:%Y-%m-%d %H:%M:%S} UTC"
    if filters := report.filters.describe():
        lines.append(f"filters: {clean(filters)}")
    return "\n".join(lines)


def _figures(summary: Summary) -> str:
    values = (summary.avg_ms, summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms)
    return " ".join(ms(v) for v in values)


def _endpoints(stats: Sequence[EndpointStats]) -> list[str]:
    tables = []
    for (protocol, side), (title, errors, client_errors) in _SECTIONS.items():
        rows = [s for s in stats if (s.endpoint.protocol, s.endpoint.side) == (protocol, side)]
        if not rows:
            continue
        head = f"{title:<38} {'calls':>6} {errors:>6} {client_errors:>6} " + " ".join(
            f"{h:>7}" for h in ("avg", "p50", "p95", "p99", "max")
        )
        lines = [head.rstrip()]
        for s in rows:
            client = _percent(s.client_error_rate) if protocol == "http" else ""
            lines.append(
                f"{fit(s.endpoint.name, 38)} {s.summary.count:>6} {_percent(s.error_rate):>6} "
                f"{client:>6} {_figures(s.summary)}" + ("  stream" if s.stream else "")
            )
        tables.append("\n".join(lines))
    return tables


def _phases(report: Report) -> str:
    if not report.phases:
        return ""
    head = f"{'PHASES (ms)':<20} {'count':>6} " + " ".join(
        f"{h:>7}" for h in ("avg", "p50", "p95", "p99", "max", "budget", ">budget")
    )
    lines = [head]
    for p in report.phases:
        budget = ms(p.budget_ms) if p.budget_ms is not None else "      -"
        over = f"{p.over_budget:>7}" if p.budget_ms is not None else "      -"
        mark = "  P95 OVER" if p.p95_over_budget else ""
        lines.append(f"{fit(p.phase, 20)} {p.summary.count:>6} {_figures(p.summary)} {budget} {over}{mark}")
    return "\n".join(lines)


def waterfalls(slowest: Sequence[Waterfall], streams: int) -> str:
    if not slowest:
        return ""
    blocks = [
        "SLOWEST TRACES (a job's trace is shown under the request that submitted it: ↪)"
        + (f"\n{streams_note(streams)}" if streams else "")
    ]
    for rank, waterfall in enumerate(slowest, start=1):
        linked = len(waterfall.trace_ids) - 1
        title = f"#{rank} trace {waterfall.trace_id}  {waterfall.duration_ms:.1f} ms, "
        title += f"{waterfall.span_count} spans" + (f", +{linked} linked" if linked else "")
        lines = [title, f"  {'span':<34} {'service':<17} {'ms':>8}  timeline"]
        lines += [_waterfall_row(row, waterfall.duration_ms) for row in waterfall.rows]
        if waterfall.hidden:
            lines.append(f"  … {waterfall.hidden} more spans")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _waterfall_row(row: WaterfallRow, total_ms: float) -> str:
    """`! name  service  ms  |   ████     |`: `!` marks a failed span."""
    indent = "  " * min(row.depth, 8)
    name = indent + ("↪ " if row.linked else "") + clean(row.name)
    mark = "!" if row.error else " "
    return f"{mark} {fit(name, 34)} {fit(row.service, 17)} {ms(row.duration_ms, 8)}  |{_bar(row, total_ms)}|"


def _bar(row: WaterfallRow, total_ms: float) -> str:
    scale = _BAR / total_ms if total_ms > 0 else 0.0
    first = min(int(row.offset_ms * scale), _BAR - 1)
    last = max(first + 1, min(_BAR, round((row.offset_ms + row.duration_ms) * scale)))
    return " " * first + "█" * (last - first) + " " * (_BAR - last)


def _errors(report: Report) -> str:
    if not report.errors:
        return ""
    lines = [f"{'TOP ERROR CAUSES (where they began)':<24} {'count':>6}  {'cause':<33} example trace"]
    for cause in report.errors[:10]:
        lines.append(
            f"{fit(cause.span_name, 24)} {cause.count:>6}  {fit(cause.cause, 33)} {cause.example_trace_id}"
        )
    if len(report.errors) > 10:
        lines.append(f"… {len(report.errors) - 10} more causes (see --json or --html)")
    return "\n".join(lines)


def inputs_note(counts: ReadCounts) -> str:
    """What was read, and what was skipped as unreadable."""
    text = f"Read {_count(counts.files, 'file')}: {_count(counts.lines, 'line')}, "
    text += f"{_count(counts.spans, 'span')}."
    if counts.bad_lines:
        text += f" Skipped {_count(counts.bad_lines, 'unreadable line')} (the first at {counts.first_bad})."
    if counts.bad_spans:
        text += f" Skipped {_count(counts.bad_spans, 'malformed span')}."
    return text


def streams_note(streams: int) -> str:
    """Why some long traces are not among the slowest."""
    return f"Left out: {_count(streams, 'stream')} (event streams, subscriptions): long while listened to."


def _footer(report: Report) -> str:
    return textwrap.fill(clean(inputs_note(report.counts)), WIDTH)


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"
