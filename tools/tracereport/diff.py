"""`trace-report diff BEFORE AFTER`: two sets of traces (before and after a change) side by side:
per route its latency and error rate and how they moved, per span path (the names from the root
down) its mean duration, and the paths one side has and the other not; a non-zero exit past the
thresholds, for CI."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.tracereport.findings import Tree, routes_of
from tools.tracereport.model import ReadCounts
from tools.tracereport.selection import Filters, load_spans
from tools.tracereport.stats import is_error, percentile
from tools.tracereport.traces import TraceSet

EXIT_WORSE = 3
MIN_TRACES = 5
"""Traces a route needs on both sides before its change can fail the comparison."""


@dataclass(frozen=True)
class Side:
    traces: int
    p50_ms: float
    p95_ms: float
    error_rate: float
    paths: dict[str, float] = field(default_factory=dict)
    """Mean duration of each span path."""
    path_errors: dict[str, float] = field(default_factory=dict)
    """Share of each span path's spans that failed."""


@dataclass(frozen=True)
class RouteDiff:
    route: str
    before: Side | None
    after: Side | None

    @property
    def p95_change(self) -> float | None:
        if self.before is None or self.after is None or self.before.p95_ms <= 0:
            return None
        return self.after.p95_ms / self.before.p95_ms - 1

    @property
    def error_change(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after.error_rate - self.before.error_rate

    def worse(self, latency: float, errors: float) -> list[str]:
        """Why this route fails the comparison (empty: it does not)."""
        if self.before is None or self.after is None:
            return []
        if min(self.before.traces, self.after.traces) < MIN_TRACES:
            return []
        reasons = []
        if (change := self.p95_change) is not None and change > latency:
            reasons.append(f"p95 {self.before.p95_ms:.1f} → {self.after.p95_ms:.1f} ms ({change:+.0%})")
        if (moved := self.error_change) is not None and moved > errors:
            reasons.append(f"errors {self.before.error_rate:.1%} → {self.after.error_rate:.1%}")
        return reasons


def side_of(trees: Sequence[Tree]) -> Side:
    durations = sorted(tree.duration_ms for tree in trees)
    errors = sum(1 for tree in trees if tree.root is not None and is_error(tree.root))
    sums: dict[str, list[float]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for tree in trees:
        by_id = {span.span_id: span for span in tree.spans}
        for span in tree.spans:
            names, current = [span.name], span
            while current.parent_id is not None and current.parent_id in by_id and len(names) < 8:
                current = by_id[current.parent_id]
                names.append(current.name)
            path = " > ".join(reversed(names))
            sums[path].append(span.duration_ms)
            failed[path] += is_error(span)
    return Side(
        len(trees),
        percentile(durations, 50),
        percentile(durations, 95),
        errors / len(trees) if trees else 0.0,
        {path: statistics.fmean(values) for path, values in sums.items()},
        {path: failed[path] / len(values) for path, values in sums.items()},
    )


def compare(before: TraceSet, after: TraceSet) -> list[RouteDiff]:
    routes_before, routes_after = routes_of(before), routes_of(after)
    return [
        RouteDiff(
            route,
            side_of(routes_before[route]) if route in routes_before else None,
            side_of(routes_after[route]) if route in routes_after else None,
        )
        for route in sorted(routes_before.keys() | routes_after.keys())
    ]


def render(diffs: Sequence[RouteDiff], top: int = 5) -> str:
    lines = [
        f"{'ROUTE':<40} {'traces':>13} {'p50 ms':>17} {'p95 ms':>17} {'Δp95':>7} {'errors':>15}",
    ]
    for diff in diffs:
        b, a = diff.before, diff.after
        if b is None or a is None:
            present = "after only" if b is None else "before only"
            lines.append(f"{diff.route[:40]:<40} {present}")
            continue
        change = diff.p95_change
        lines.append(
            f"{diff.route[:40]:<40} {b.traces:>6} → {a.traces:<4} {b.p50_ms:>7.1f} → {a.p50_ms:<7.1f} "
            f"{b.p95_ms:>7.1f} → {a.p95_ms:<7.1f} {'' if change is None else f'{change:+.0%}':>7} "
            f"{b.error_rate:>6.1%} → {a.error_rate:<6.1%}"
        )
        moved = sorted(
            ((path, b.paths[path], a.paths[path]) for path in b.paths.keys() & a.paths.keys()),
            key=lambda row: -abs(row[2] - row[1]),
        )
        for path, was, now in moved[:top]:
            if abs(now - was) >= 0.1:
                lines.append(f"    {path[:70]:<70} {was:>8.1f} → {now:<8.1f} ms")
        for path in sorted(b.path_errors.keys() & a.path_errors.keys()):
            if abs(a.path_errors[path] - b.path_errors[path]) >= 0.01:
                errors = f"{b.path_errors[path]:.0%} → {a.path_errors[path]:.0%} failed"
                lines.append(f"  ! {path[:70]:<70} {errors}")
        for path in sorted(a.paths.keys() - b.paths.keys())[:top]:
            lines.append(f"  + {path[:70]}")
        for path in sorted(b.paths.keys() - a.paths.keys())[:top]:
            lines.append(f"  - {path[:70]}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str], expand_paths: Callable[[Sequence[str]], list[Path]]) -> int:
    parser = argparse.ArgumentParser(
        prog="renderflow trace-report diff",
        description="Two sets of traces, before and after a change: latency and errors per route and "
        "per span path, spans added and removed; exit 3 past the thresholds.",
    )
    parser.add_argument("before", metavar="BEFORE", help="span files: a file, a directory or a glob")
    parser.add_argument("after", metavar="AFTER")
    parser.add_argument(
        "--max-p95-increase", type=float, default=0.2, metavar="SHARE", help="default 0.2 (+20 %%)"
    )
    parser.add_argument(
        "--max-error-increase", type=float, default=0.01, metavar="SHARE", help="default 0.01 (1 point)"
    )
    args = parser.parse_args(argv)
    try:
        sets = [
            TraceSet(load_spans(expand_paths([p]), Filters(), ReadCounts()))
            for p in (args.before, args.after)
        ]
    except (ValueError, OSError) as error:
        print(f"trace-report diff: {error}", file=sys.stderr)
        return 1
    diffs = compare(*sets)
    sys.stdout.write(render(diffs))
    worse = [(d.route, why) for d in diffs for why in d.worse(args.max_p95_increase, args.max_error_increase)]
    for route, why in worse:
        print(f"trace-report diff: {route}: {why}", file=sys.stderr)
    return EXIT_WORSE if worse else 0
