"""Where a route's time goes, over all its traces (pure): the critical path of each trace (what
the request waited for: from its end backwards, the child that ended last, then what came before
it), summed by span name: the time of a span on the path that none of its children covers (its own
work, or for the root, work nobody instrumented), next to the span's whole and own time; and slow
against fast: for the route's traces at or above its
p95, which spans grew and which attribute values they carry more often than the rest.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tools.tracereport.findings import Tree, routes_of
from tools.tracereport.model import Span
from tools.tracereport.stats import percentile
from tools.tracereport.traces import TraceSet

MIN_TRACES = 20
"""Traces a route needs before slow and fast are told apart."""
HIGH_CARDINALITY = 0.5
"""Attribute keys with more distinct values than this share of spans (ids, times) are not compared."""


@dataclass(frozen=True)
class PathShare:
    """One span name's time on a route's critical paths (per trace), and its time in all."""

    name: str
    p50_ms: float
    p95_ms: float
    share: float
    """Of the route's critical-path time, over all its traces."""
    total_ms: float
    """Mean per trace of the spans' whole durations (overlapping ones counted each)."""
    self_ms: float
    """Mean per trace of the spans' own time: not covered by their children, on the path or not."""
    root: bool = False
    """The route's own span: its time on the path is its own work or what nobody instrumented."""


@dataclass(frozen=True)
class RoutePath:
    route: str
    traces: int
    p50_ms: float
    shares: list[PathShare]


@dataclass(frozen=True)
class SlowFast:
    """What sets a route's slowest 5 % apart."""

    route: str
    slow: int
    fast: int
    grew: list[tuple[str, float, float]]
    """Span names whose critical-path time grew most: (name, mean ms in fast, mean ms in slow)."""
    over_represented: list[tuple[str, float, float]]
    """Attribute `key=value`s more frequent in slow traces: (pair, share of fast, share of slow)."""


def critical_path(root: Span, children: Mapping[str, Sequence[Span]]) -> dict[str, float]:
    """Milliseconds of each span name on the critical path under `root` (a span's part not
    covered by the children on the path)."""
    spent: dict[str, float] = defaultdict(float)

    def walk(span: Span, until_ns: int, depth: int) -> None:
        cursor = min(span.end_ns, until_ns)
        kids = sorted(children.get(span.span_id, ()), key=lambda s: s.end_ns, reverse=True)
        for child in kids:
            if child.start_ns >= cursor or child.end_ns <= span.start_ns or depth > 200:
                continue
            child_end = min(child.end_ns, cursor)
            spent[span.name] += (cursor - child_end) / 1e6
            walk(child, child_end, depth + 1)
            cursor = max(child.start_ns, span.start_ns)
        spent[span.name] += max(0, cursor - span.start_ns) / 1e6

    walk(root, root.end_ns, 0)
    return spent


def route_paths(traces: TraceSet, top: int = 6) -> list[RoutePath]:
    """Per route (`routes_of`: requests and jobs, each with its root), the span names with most
    time on its critical paths."""
    found = []
    for route, trees in routes_of(traces).items():
        paths = [_path(tree) for tree in trees]
        total = sum(sum(path.values()) for path in paths) or 1.0
        names = {name for path in paths for name in path}
        own = [tree.self_time() for tree in trees]
        whole: list[dict[str, float]] = []
        for tree in trees:
            spans_time: dict[str, float] = defaultdict(float)
            for span in tree.spans:
                spans_time[span.name] += span.duration_ms
            whole.append(spans_time)
        roots = {tree.root.name for tree in trees if tree.root is not None}
        shares = []
        for name in names:
            values = sorted(path.get(name, 0.0) for path in paths)
            shares.append(
                PathShare(
                    name,
                    percentile(values, 50),
                    percentile(values, 95),
                    sum(values) / total,
                    _mean(w.get(name, 0.0) for w in whole),
                    _mean(o.get(name, 0.0) for o in own),
                    root=name in roots,
                )
            )
        shares.sort(key=lambda s: -s.share)
        durations = sorted(tree.duration_ms for tree in trees)
        found.append(RoutePath(route, len(trees), percentile(durations, 50), shares[:top]))
    return sorted(found, key=lambda r: -r.traces)


def slow_vs_fast(traces: TraceSet, top: int = 3) -> list[SlowFast]:
    """Per route with enough traces, its slowest 5 % against the rest."""
    found = []
    for route, trees in routes_of(traces).items():
        if len(trees) < MIN_TRACES:
            continue
        cut = percentile(sorted(tree.duration_ms for tree in trees), 95)
        slow = [tree for tree in trees if tree.duration_ms >= cut]
        fast = [tree for tree in trees if tree.duration_ms < cut]
        if not slow or not fast:
            continue
        slow_paths = [_path(tree) for tree in slow]
        fast_paths = [_path(tree) for tree in fast]
        names = {name for path in slow_paths + fast_paths for name in path}
        grew = sorted(
            (
                (
                    name,
                    _mean(p.get(name, 0.0) for p in fast_paths),
                    _mean(p.get(name, 0.0) for p in slow_paths),
                )
                for name in names
            ),
            key=lambda row: -(row[2] - row[1]),
        )
        found.append(
            SlowFast(
                route, len(slow), len(fast), [g for g in grew[:top] if g[2] > g[1]], _over(slow, fast, top)
            )
        )
    return found


def _over(slow: Sequence[Tree], fast: Sequence[Tree], top: int) -> list[tuple[str, float, float]]:
    """Attribute values found in a larger share of slow traces than of fast ones, by at least half;
    keys with a value per span or nearly (ids, times) left out."""
    values: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for tree in [*slow, *fast]:
        for span in tree.spans:
            for key, value in span.attributes.items():
                values[key].add(str(value))
                counts[key] += 1
    wanted = {key for key, seen in values.items() if len(seen) <= max(2, HIGH_CARDINALITY * counts[key])}

    def pairs(tree: Tree) -> set[str]:
        return {f"{k}={v}" for span in tree.spans for k, v in span.attributes.items() if k in wanted}

    slow_sets, fast_sets = [pairs(t) for t in slow], [pairs(t) for t in fast]
    rows = []
    for pair in set().union(*slow_sets):
        in_slow = sum(pair in found for found in slow_sets) / len(slow_sets)
        in_fast = sum(pair in found for found in fast_sets) / len(fast_sets)
        if in_slow - in_fast >= 0.5:
            rows.append((pair, in_fast, in_slow))
    return sorted(rows, key=lambda row: (row[1] - row[2], row[0]))[:top]


def _path(tree: Tree) -> dict[str, float]:
    assert tree.root is not None
    return critical_path(tree.root, tree.children)


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    return statistics.fmean(listed) if listed else 0.0
