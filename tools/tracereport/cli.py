"""Command line of the trace report: `renderflow trace-report FILE...` (or `python -m
tools.tracereport`)."""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from shared.contract import PHASE_BUDGETS_MS
from tools.tracereport import diff
from tools.tracereport.critical import route_paths, slow_vs_fast
from tools.tracereport.findings import KINDS, find
from tools.tracereport.html import render_html
from tools.tracereport.model import ReadCounts, Span
from tools.tracereport.quality import data_quality
from tools.tracereport.report import build_report, report_dict
from tools.tracereport.review import render_review
from tools.tracereport.selection import Filters, load_spans, parse_since
from tools.tracereport.stats import error_causes
from tools.tracereport.text import render_text, waterfalls
from tools.tracereport.traces import TraceSet

ONE_REQUEST_ROWS = 500
"""The most spans a one-request waterfall shows."""
FINDINGS_EXIT = 3
"""The exit status when `--fail-on` names a kind of finding that was made."""


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the report of the span files in `argv` (and writes --html/--json/--review), or with
    `diff BEFORE AFTER` compares two sets of them; the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["diff"]:
        return diff.main(arguments[1:], expand_paths)
    parser = _parser()
    args = parser.parse_args(arguments)
    try:
        paths = expand_paths(args.files)
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
        budgets = {**PHASE_BUDGETS_MS, **dict(_budget(b) for b in args.budget)}
    except ValueError as error:
        parser.error(str(error))
    filters = Filters(
        since=since,
        route=args.route,
        services=tuple(args.service),
        trace_id=args.trace,
        render_id=args.render,
    )
    counts = ReadCounts()
    try:
        spans = load_spans(paths, filters, counts)
    except OSError as error:
        print(f"trace-report: {error}", file=sys.stderr)
        return 1
    if args.trace or args.render:
        return _one_request(spans, filters)
    report = build_report(spans, counts, filters, budgets, top=args.top)
    trace_set = TraceSet(spans)
    found = find(trace_set)
    quality = data_quality(trace_set)

    def review() -> str:
        return render_review(report, found, quality, route_paths(trace_set), slow_vs_fast(trace_set))

    sys.stdout.write(render_text(report))
    try:
        if args.review == "-":
            sys.stdout.write("\n" + review())
        elif args.review:
            Path(args.review).write_text(review(), encoding="utf-8")
        if args.html:
            Path(args.html).write_text(render_html(report, found), encoding="utf-8")
        if args.json:
            Path(args.json).write_text(json.dumps(report_dict(report), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        print(f"trace-report: {error}", file=sys.stderr)
        return 1
    gates = dict(args.fail_on)
    failing = [f for f in found if f.kind in gates and f.saving_ms >= gates[f.kind]]
    for finding in failing:
        print(f"trace-report: {finding.kind} in {finding.route}: {finding.evidence}", file=sys.stderr)
    limit = args.max_error_rate
    erring = [e for e in report.endpoints if limit is not None and e.error_rate > limit]
    for endpoint in erring:
        print(
            f"trace-report: {endpoint.endpoint.name} fails {endpoint.error_rate:.1%} of calls",
            file=sys.stderr,
        )
    return FINDINGS_EXIT if failing or erring else 0


def _one_request(spans: list[Span], filters: Filters) -> int:
    """One request (or render) and the traces linked to it, span by span, with where it failed."""
    if not spans:
        print(f"trace-report: no spans of {filters.describe()}", file=sys.stderr)
        return 1
    traces = TraceSet(spans)
    shown = [traces.waterfall(group, ONE_REQUEST_ROWS) for group in traces.groups()]
    sys.stdout.write(waterfalls(sorted(shown, key=lambda w: w.start_ns), 0) + "\n")
    for cause in error_causes(traces):
        passed = f", passed on by {cause.passed_through} span(s) above" if cause.passed_through else ""
        print(f"failed at {cause.span_name} ({', '.join(cause.services)}): {cause.cause}{passed}")
    return 0


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by the arguments: a file, a directory (its span files: *.jsonl and *.json, rotated
    ones and compressed ones too) or a glob pattern; ValueError for an argument that names nothing."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and _SPAN_FILE.search(p.name))
        elif path.exists():
            paths.append(path)
        elif matches := sorted(glob.glob(pattern, recursive=True)):
            paths += [Path(match) for match in matches if Path(match).is_file()]
        else:
            raise ValueError(f"no such file, directory or match: {pattern}")
    return list(dict.fromkeys(paths))


_SPAN_FILE = re.compile(r"\.jsonl?(\.\d+)?(\.gz|\.zst)?$")
"""A file of spans as exporters write them: `traces.jsonl`, rotated `traces.jsonl.1`, compressed."""


def _gate(value: str) -> tuple[str, float]:
    """`KIND` or `KIND:MS`: a kind of finding, and the least saving per request that fails."""
    kind, _, least = value.partition(":")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"{kind!r} is none of {', '.join(sorted(KINDS))}")
    try:
        return kind, float(least) if least else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{least!r} is not milliseconds") from None


def _budget(value: str) -> tuple[str, float]:
    phase, equals, budget = value.partition("=")
    try:
        if not (phase and equals):
            raise ValueError
        return phase.strip(), float(budget)
    except ValueError:
        raise ValueError(f"--budget wants PHASE=MS, not {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="renderflow trace-report",
        description="Latency per route and RPC method, phases against their budgets, the slowest traces "
        "as waterfalls and the top error causes, from OTLP-JSON span files (.run/traces.jsonl).",
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="span files, directories of *.jsonl, or globs"
    )
    parser.add_argument("--top", type=int, default=5, metavar="N", help="slowest traces to draw (default 5)")
    parser.add_argument(
        "--since", metavar="WHEN", help="only spans since an RFC 3339 time or a duration ago (15m, 2h)"
    )
    parser.add_argument(
        "--route", metavar="PATTERN", help="only traces with an endpoint matching (substring or glob)"
    )
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="only traces touching this service (repeatable)",
    )
    parser.add_argument("--trace", metavar="ID", help="only this trace and those linked to it, span by span")
    parser.add_argument(
        "--render", metavar="ID", help="only this render's traces (its submit and its jobs), span by span"
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PHASE=MS",
        help="override a phase budget (repeatable)",
    )
    parser.add_argument("--html", metavar="OUT", help="also write the report as a self-contained HTML page")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument(
        "--review",
        metavar="OUT",
        help="also write the performance review as Markdown ('-': after the report)",
    )
    parser.add_argument(
        "--max-error-rate",
        type=float,
        metavar="SHARE",
        help=f"exit {FINDINGS_EXIT} when an endpoint fails more than this share of its calls (0.01: 1 %%)",
    )
    parser.add_argument(
        "--fail-on",
        action="append",
        default=[],
        type=_gate,
        metavar="KIND[:MS]",
        help=f"exit {FINDINGS_EXIT} when a finding of this kind is made, saving at least MS per request "
        "(repeatable): " + ", ".join(sorted(KINDS)),
    )
    return parser
