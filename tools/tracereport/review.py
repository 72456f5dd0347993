"""The performance review as Markdown (`trace-report --review`): what fails, what is slow and why,
what to do first (ranked by estimated saving x how often), and the figures to track."""

from __future__ import annotations

from collections.abc import Sequence

from tools.tracereport.critical import RoutePath, SlowFast
from tools.tracereport.findings import KINDS, Finding
from tools.tracereport.quality import Quality
from tools.tracereport.report import Report


def render_review(
    report: Report,
    findings: Sequence[Finding],
    quality: Quality | None = None,
    paths: Sequence[RoutePath] = (),
    tails: Sequence[SlowFast] = (),
) -> str:
    window = (
        f" from {report.start:%Y-%m-%d %H:%M:%S} to {report.end:%H:%M:%S} UTC"
        if report.start and report.end
        else ""
    )
    lines = [
        "# Performance review",
        "",
        f"{report.trace_count} traces, {report.span_count} spans{window}.",
        "",
    ]
    failing = [f for f in findings if f.kind == "failing_route"]
    slow = [f for f in findings if f.kind != "failing_route"]
    lines += ["## Critical issues", ""]
    if failing:
        for finding in failing:
            lines.append(f"- **{finding.route}** fails: {finding.evidence}. At `{finding.location}`.")
            lines.append(f"  {finding.recommendation} Exemplars: {_ids(finding)}.")
    else:
        lines.append("No route fails.")
    lines += ["", "## Bottlenecks, by estimated saving", ""]
    if slow:
        lines += [
            "| # | finding | route | saving per request | requests | total | where |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for rank, finding in enumerate(slow, 1):
            label = KINDS[finding.kind] + (" (candidate)" if finding.candidate else "")
            lines.append(
                f"| {rank} | {label} | `{finding.route}` | {finding.saving_ms:.0f} ms | "
                f"{finding.occurrences} of {finding.traces} | {finding.total_saving_ms / 1000:.1f} s | "
                f"`{finding.location}` |"
            )
        lines += ["", "## Recommendations", ""]
        for rank, finding in enumerate(slow, 1):
            lines.append(f"{rank}. **{KINDS[finding.kind]}** in `{finding.route}`: {finding.evidence}.")
            lines.append(f"   {finding.recommendation} Exemplars: {_ids(finding)}.")
    else:
        lines.append("Nothing found worth a change.")
    lines += [
        "",
        "## Routes",
        "",
        "| route | requests | avg | p50 | p95 | max | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    served = [e for e in report.endpoints if e.endpoint.side == "server" and not e.stream]
    for stats in served:
        s = stats.summary
        lines.append(
            f"| `{stats.endpoint.name}` | {s.count} | {s.avg_ms:.0f} ms | {s.p50_ms:.0f} ms | "
            f"{s.p95_ms:.0f} ms | {s.max_ms:.0f} ms | {stats.error_rate:.1%} |"
        )
    if paths:
        lines += ["", "## Where the time goes (critical path)", ""]
        lines.append(
            "What each route's requests waited for: a span's time on the path that its children do not "
            "cover (its own work; for the route's own span, also work nobody instrumented), beside the "
            "span's whole and own time per request."
        )
        for route in paths:
            lines += ["", f"`{route.route}` ({route.traces} traces, p50 {route.p50_ms:.0f} ms):", ""]
            lines += [
                "| span | on the path p50 | p95 | share | whole | own |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            lines += [
                f"| `{s.name}`{' (incl. uninstrumented)' if s.root else ''} | {s.p50_ms:.1f} ms | "
                f"{s.p95_ms:.1f} ms | {s.share:.0%} | {s.total_ms:.1f} ms | {s.self_ms:.1f} ms |"
                for s in route.shares
            ]
    if tails:
        lines += ["", "## Slow against fast", ""]
        for tail in tails:
            grew = (
                ", ".join(f"`{name}` {fast:.0f} → {slow:.0f} ms" for name, fast, slow in tail.grew)
                or "nothing"
            )
            over = ", ".join(
                f"`{pair}` ({fast:.0%} of fast, {slow:.0%} of slow)"
                for pair, fast, slow in tail.over_represented
            )
            lines.append(
                f"- `{tail.route}`, its {tail.slow} slowest (p95 and above) against {tail.fast}: grew: {grew}"
                + (f"; more often: {over}" if over else "")
            )
    lines += ["", "## Metrics to track", ""]
    for stats in served:
        budget = max(1.0, stats.summary.p95_ms)
        lines.append(
            f"- `{stats.endpoint.name}`: p95 at most {budget:.0f} ms (today's), error rate under 1 % "
            f"(today {stats.error_rate:.1%})."
        )
    if quality is not None:
        lines += ["", "## Data quality", ""]
        if quality.clean:
            lines.append(f"All {quality.spans} spans of {quality.traces} traces are whole and in order.")
        else:
            lines += [
                f"- {quality.orphans} span(s) whose parent is missing; {quality.without_root} trace(s) "
                "without their root (the findings of those requests may be incomplete)",
                f"- {quality.skewed} span(s) outside their parent's time by more than 1 ms (clock skew "
                "between hosts, or work that outlived the span that started it)",
                f"- {quality.calls_without_detail} call(s) without their statement or URL (repeated calls "
                "among them cannot be told apart)",
            ]
    return "\n".join(lines) + "\n"


def _ids(finding: Finding) -> str:
    return ", ".join(f"`{trace_id}`" for trace_id in finding.exemplars)
