"""The report as one self-contained HTML page: inline CSS and SVG charts drawn here, no scripts,
every span-provided text escaped."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape

from tools.tracereport.findings import KINDS, Finding
from tools.tracereport.report import Report
from tools.tracereport.stats import EndpointStats, PhaseStats, Summary
from tools.tracereport.text import inputs_note, ms, streams_note
from tools.tracereport.traces import Waterfall

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#bab0ac", "#ff9da7",
            "#86bcb6")  # fmt: skip
_ERROR = "#e15759"
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: 2px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
tr:nth-child(even) td { background: #f6f6f6; }
td.over { color: #c00; font-weight: bold; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(310px, 1fr)); gap: 1em; }
.grid figure { margin: 0; } figcaption { font-size: 12px; font-family: monospace; }
svg text { font: 11px system-ui, sans-serif; fill: #333; } svg .mono { font-family: monospace; }
.muted { color: #777; } code { font-size: 12px; }
"""


def render_html(report: Report, findings: Sequence[Finding] = ()) -> str:
    """The whole report as an HTML document, with the review's findings first when given."""
    e = escape
    period = (
        f"{report.start:%Y-%m-%d %H:%M:%S} to {report.end:%H:%M:%S} UTC"
        if report.start and report.end
        else ""
    )
    body = [
        "<h1>Trace report</h1>",
        f"<p>{report.trace_count:,} traces, {report.span_count:,} spans. {e(period)}</p>",
        f"<p>Filters: {e(filters)}</p>" if (filters := report.filters.describe()) else "",
        *(["<h2>Findings</h2>", _findings_table(findings)] if findings else []),
        "<h2>Phases</h2>",
        _phase_chart(report.phases),
        _stacked_phases(report.phases),
        _phase_table(report.phases),
        "<h2>Endpoints</h2>",
        _endpoint_table(report.endpoints),
        '<div class="grid">',
        *(_histogram(s) for s in report.endpoints),
        "</div>",
        "<h2>Slowest traces</h2>",
        f'<p class="muted">{e(streams_note(report.streams))}</p>' if report.streams else "",
        *(_waterfall(rank, w) for rank, w in enumerate(report.slowest, start=1)),
        "<h2>Top error causes (where they began)</h2>",
        _error_table(report),
        f'<p class="muted">{e(inputs_note(report.counts))}</p>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Renderflow trace report</title>"
        f"<style>{_CSS}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table; cells are HTML already (escape span text before)."""
    lines = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = (cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row)
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def _figures(summary: Summary) -> list[str]:
    values = (summary.avg_ms, summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms)
    return [str(summary.count), *(ms(v).strip() for v in values)]


def _endpoint_table(stats: Sequence[EndpointStats]) -> str:
    head = ("endpoint", "side", "calls", "avg", "p50", "p95", "p99", "max", "errors", "4xx")
    rows = []
    for s in stats:
        client = f"{s.client_error_rate:.1%}" if s.endpoint.protocol == "http" else "-"
        errors = f"{s.error_rate:.1%}"
        rows.append(
            [
                f"<code>{escape(s.endpoint.name)}</code>"
                + (' <span class="muted">stream</span>' if s.stream else ""),
                f"{s.endpoint.protocol} {s.endpoint.side}",
                *_figures(s.summary),
                f'<td class="over">{errors}</td>' if s.errors else errors,
                client,
            ]
        )
    return _table(head, rows) if rows else '<p class="muted">No HTTP or RPC spans.</p>'


def _phase_table(phases: Sequence[PhaseStats]) -> str:
    head = ("phase", "count", "avg", "p50", "p95", "p99", "max", "budget", "spans over budget")
    rows = []
    for p in phases:
        over = str(p.over_budget) if p.budget_ms is not None else "-"
        rows.append(
            [
                escape(p.phase),
                *_figures(p.summary),
                f"{p.budget_ms:g}" if p.budget_ms is not None else "-",
                f'<td class="over">{over} (p95 over)</td>' if p.p95_over_budget else over,
            ]
        )
    return _table(head, rows) if rows else ""


def _findings_table(findings: Sequence[Finding]) -> str:
    rows = [
        [escape(KINDS[f.kind] + (" (candidate)" if f.candidate else "")), f"<code>{escape(f.route)}</code>",
         f"{f.saving_ms:,.0f} ms", f"{f.occurrences} of {f.traces}", escape(f.location), escape(f.evidence),
         escape(f.recommendation), " ".join(f"<code>{escape(t)}</code>" for t in f.exemplars)]
        for f in findings
    ]  # fmt: skip
    head = (
        "finding",
        "route",
        "saving per request",
        "requests",
        "where",
        "evidence",
        "what to do",
        "exemplars",
    )
    return _table(head, rows)


def _error_table(report: Report) -> str:
    rows = [
        [escape(c.span_name), escape(c.cause), str(c.count), escape(", ".join(c.services)),
         f"<code>{escape(c.example_trace_id)}</code>"]
        for c in report.errors
    ]  # fmt: skip
    if not rows:
        return '<p class="muted">No failed spans.</p>'
    return _table(("span", "cause", "count", "services", "example trace"), rows)


def _svg(width: int, height: int, parts: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">' + "".join(parts) + "</svg>"
    )


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str, extra: str = "") -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 1):.1f}" height="{h:.1f}" fill="{fill}"{extra}>'
        f"<title>{escape(title)}</title></rect>"
    )


def _text(x: float, y: float, text: str, anchor: str = "start", css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{cls}>{escape(text)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, extra: str = "") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{extra}/>'


def _phase_chart(phases: Sequence[PhaseStats]) -> str:
    """p50 (dark) and p95 (light) per phase on a log axis, the budget as a red line."""
    if not phases:
        return '<p class="muted">No phase spans.</p>'
    values = [v for p in phases for v in (p.summary.p50_ms, p.summary.p95_ms, p.budget_ms or 0) if v > 0]
    lo = 10 ** math.floor(math.log10(min(values, default=1)))
    hi = 10 ** math.ceil(math.log10(max(values, default=10)))
    hi = max(hi, lo * 10)
    left, plot, row = 160, 560, 26
    top = 24
    height = top + row * len(phases) + 30

    def x(value: float) -> float:
        return left + plot * (math.log10(max(value, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    parts = [_text(left, 12, "p50 (dark) and p95 (light) per phase, ms, log scale; red: budget")]
    decade = lo
    while decade <= hi:
        parts.append(_line(x(decade), top - 4, x(decade), height - 26, "#ddd"))
        parts.append(_text(x(decade), height - 12, _duration_label(decade), "middle"))
        decade *= 10
    for i, p in enumerate(phases):
        y = top + i * row
        over = p.p95_over_budget
        parts.append(_text(left - 8, y + 16, p.phase, "end"))
        parts.append(_rect(left, y + 3, x(p.summary.p95_ms) - left, 18, "#f4a6a6" if over else "#a8c5e6",
                           f"{p.phase} p95 {p.summary.p95_ms:.1f} ms"))  # fmt: skip
        parts.append(_rect(left, y + 7, x(p.summary.p50_ms) - left, 10, _ERROR if over else _PALETTE[0],
                           f"{p.phase} p50 {p.summary.p50_ms:.1f} ms"))  # fmt: skip
        if p.budget_ms is not None:
            parts.append(_line(x(p.budget_ms), y, x(p.budget_ms), y + 24, _ERROR, ' stroke-width="2"'))
        figures = f"{p.summary.p50_ms:.1f} / {p.summary.p95_ms:.1f}"
        parts.append(_text(left + plot + 8, y + 16, figures + (" OVER" if over else "")))
    return _svg(left + plot + 140, height, parts, "phase latency against budgets")


def _stacked_phases(phases: Sequence[PhaseStats]) -> str:
    """One bar: the share of all time spent in phases that each phase takes, with a legend."""
    totals = [(p.phase, p.summary.avg_ms * p.summary.count) for p in phases]
    grand = sum(total for _, total in totals)
    if grand <= 0:
        return ""
    width, x = 860, 0.0
    parts = [_text(0, 12, "share of all time spent in phases")]
    for i, (phase, total) in enumerate(totals):
        color, share = _PALETTE[i % len(_PALETTE)], total / grand
        parts.append(_rect(x, 18, width * share, 22, color, f"{phase}: {share:.1%}"))
        x += width * share
        column, line = i % 4, i // 4
        parts.append(_rect(column * 215, 50 + line * 18, 10, 10, color, phase))
        parts.append(_text(column * 215 + 14, 59 + line * 18, f"{phase} {share:.1%}"))
    return _svg(width, 56 + 18 * math.ceil(len(totals) / 4), parts, "share of time per phase")


def _histogram(stats: EndpointStats) -> str:
    """Latency distribution of one endpoint (log-spaced bins, count over each bar)."""
    bins, summary = stats.summary.histogram, stats.summary
    if not bins:
        return ""
    width, height, base = 300, 136, 96
    peak = max(b.count for b in bins)
    step = width / len(bins)
    every = math.ceil(len(bins) / 6)  # at most about six edge labels
    parts = []
    for i, b in enumerate(bins):
        h = 76 * b.count / peak
        label = f"{_duration_label(b.lo_ms)} to {_duration_label(b.hi_ms)}: {b.count}"
        parts.append(_rect(i * step + 1, base - h, step - 2, h, _PALETTE[0], label))
        if b.count:
            parts.append(_text(i * step + step / 2, base - h - 3, str(b.count), "middle"))
        if i % every == 0:
            parts.append(_text(i * step + 1, base + 13, f"{b.lo_ms:g}"))
    parts.append(_line(0, base, width, base, "#999"))
    parts.append(
        _text(
            width / 2,
            base + 32,
            f"ms (log bins) · p50 {summary.p50_ms:.1f} · p95 {summary.p95_ms:.1f}",
            "middle",
        )
    )
    name = stats.endpoint.name
    caption = f"{escape(name)} <span class='muted'>({stats.endpoint.side}, {summary.count} calls)</span>"
    chart = _svg(width, height, parts, f"latency of {name}")
    return f"<figure>{chart}<figcaption>{caption}</figcaption></figure>"


def _waterfall(rank: int, waterfall: Waterfall) -> str:
    """Spans as bars on the trace's time axis; a linked trace's root is outlined dashed."""
    label_w, plot, row, top = 330, 520, 18, 22
    height = top + row * len(waterfall.rows) + 8
    total = waterfall.duration_ms or 1.0
    colors: dict[str, str] = {}
    parts = []
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        x = label_w + plot * fraction
        parts.append(_line(x, top - 4, x, height, "#eee"))
        parts.append(_text(x, 12, _duration_label(total * fraction), "middle"))
    for i, r in enumerate(waterfall.rows):
        y = top + i * row
        color = _ERROR if r.error else colors.setdefault(r.service, _PALETTE[len(colors) % len(_PALETTE)])
        name = ("↪ " if r.linked else "") + r.name
        parts.append(_text(4 + 12 * min(r.depth, 12), y + 13, name))
        title = f"{r.name} ({r.service}) {r.duration_ms:.1f} ms at +{r.offset_ms:.1f} ms, trace {r.trace_id}"
        dashed = ' stroke="#000" stroke-dasharray="3 2"' if r.linked else ""
        x = label_w + plot * r.offset_ms / total
        parts.append(_rect(x, y + 3, plot * r.duration_ms / total, row - 6, color, title, dashed))
        parts.append(_text(label_w + plot + 6, y + 13, f"{r.service} {r.duration_ms:.1f} ms"))
    more = f" ({waterfall.hidden} more spans not shown)" if waterfall.hidden else ""
    linked = len(waterfall.trace_ids) - 1
    head = (
        f"<h3>#{rank} <code>{escape(waterfall.trace_id)}</code> {waterfall.duration_ms:.1f} ms, "
        f"{waterfall.span_count} spans{f', +{linked} linked traces' if linked else ''}{escape(more)}</h3>"
    )
    return head + _svg(label_w + plot + 200, height, parts, f"waterfall of trace {waterfall.trace_id}")


def _duration_label(value_ms: float) -> str:
    if math.isinf(value_ms):
        return "∞"
    if value_ms >= 1000:
        return f"{value_ms / 1000:g} s"
    return f"{value_ms:g} ms" if value_ms >= 1 else f"{value_ms:.2g} ms"
