"""Findings: what a performance review would point at, read from the traces' structure and timing
(not from SQL text or names), each with its evidence, an estimated saving per occurrence, how often
it occurs, and exemplar traces (pure).

- sequential calls: sibling calls (database, RPC, outgoing HTTP) under one parent that run back to
  back without overlapping; saving sum - max if they ran together. A *candidate*: traces show order,
  not independence.
- repeated calls: the same statement or URL many times in one trace (N+1); saving all but one.
- blocking fetch: an outgoing HTTP call a request waits for; saving its duration (fetched ahead,
  or in the background), with how its time is spread and whether any deadline shows.
- serial loop: many same-named steps of similar duration, one after another; saving if run
  `CONCURRENCY` at a time.
- failing route: a route that answers errors, counted once per trace at the span where the error
  began (the deepest failed span), not at every span it passed through.
- long tail: a route whose slowest request is far above its median, and where that one spent it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tools.tracereport.model import Span
from tools.tracereport.stats import endpoint_of, is_error, percentile
from tools.tracereport.traces import TraceSet

MIN_RUN = 2
"""Sibling calls back to back that count as sequential."""
MAX_GAP_MS = 5.0
"""The most time between one call's end and the next one's start for them to count as back to back."""
MIN_REPEATS = 5
"""Calls of one statement or URL in one trace that count as repeated."""
MIN_LOOP = 3
"""Same-named steps one after another that count as a loop."""
LOOP_SPREAD = 0.5
"""The most a loop's step durations may vary (standard deviation over mean)."""
CONCURRENCY = 8
"""The bound of concurrency a loop's saving assumes."""
TAIL_RATIO = 10.0
"""A route's max over its p50 that makes a long tail."""
MIN_TAIL_MS = 1000.0
"""How far above the median the slowest request must be for a tail worth a review: the seed's were
minutes; a 3 ms request after 0.2 ms ones is a warm-up, a 150 ms one a busy machine."""
MIN_SAVING_MS = 1.0
"""Findings that would save less per occurrence are left out."""

KINDS = {  # the kinds of finding, as the review names them
    "failing_route": "Failing route",
    "sequential_calls": "Sequential calls",
    "repeated_calls": "Repeated calls (N+1)",
    "blocking_fetch": "Blocking external fetch",
    "serial_loop": "Serial loop",
    "long_tail": "Long tail",
}

_NUMBERS = re.compile(r"\b\d+(\.\d+)?\b|\b[0-9a-f]{8,}(-[0-9a-f]{4,}){0,4}\b", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One thing worth fixing, wherever it occurs alike."""

    kind: str
    """sequential_calls, repeated_calls, blocking_fetch, serial_loop, failing_route, long_tail."""
    route: str
    """The request it slows or fails (`GET /items/{id}`), or the root span's name."""
    location: str
    """Where: the service and spans, with code attributes when the spans carry them."""
    evidence: str
    recommendation: str
    saving_ms: float
    """Estimated per occurrence (mean over the traces where it occurs)."""
    occurrences: int
    """Traces where it occurs."""
    traces: int
    """Traces of the route."""
    exemplars: tuple[str, ...]
    candidate: bool = False
    """True when the traces cannot prove the fix is possible (independence of calls)."""
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def total_saving_ms(self) -> float:
        return self.saving_ms * self.occurrences


def routes_of(traces: TraceSet) -> dict[str, list[Tree]]:
    """The traces of requests and jobs (a server or consumer span at the root) as trees, by the
    route of their root (a request's endpoint, or the root's name); start-up work, polls and
    housekeeping, which nobody waits for, left out."""
    by_route: dict[str, list[Tree]] = defaultdict(list)
    for spans in traces.traces.values():
        tree = Tree(spans)
        if tree.root is not None and tree.root.kind in ("server", "consumer"):
            by_route[tree.route].append(tree)
    return dict(sorted(by_route.items()))


def find(traces: TraceSet) -> list[Finding]:
    """Every finding over the traces, the largest total saving first (failing routes first)."""
    findings: list[Finding] = []
    for route, group in routes_of(traces).items():
        findings += _failing(route, group)
        findings += _grouped(route, group, "sequential_calls", lambda t: t.sequential_calls())
        findings += _grouped(route, group, "repeated_calls", lambda t: t.repeated_calls())
        findings += _grouped(route, group, "serial_loop", lambda t: t.serial_loops())
        findings += _blocking_fetches(route, group)
        findings += _long_tail(route, group)
    return sorted(
        findings, key=lambda f: (f.kind != "failing_route", -f.total_saving_ms, f.route, f.location)
    )


# One trace


@dataclass(frozen=True)
class _Hit:
    """One occurrence of a pattern in one trace."""

    key: tuple[str, ...]
    """What makes occurrences in different traces the same finding."""
    location: str
    saving_ms: float
    evidence: Mapping[str, float]


class Tree:
    """One trace as a tree, with its root request."""

    root: Span | None

    def __init__(self, spans: Sequence[Span]) -> None:
        self.spans = spans
        ids = {span.span_id for span in spans}
        roots = [s for s in spans if s.parent_id is None or s.parent_id not in ids]
        self.root = min(roots, key=lambda s: (s.start_ns, s.span_id)) if roots else None
        self.children: dict[str, list[Span]] = defaultdict(list)
        for span in spans:
            if span.parent_id in ids:
                self.children[span.parent_id].append(span)
        for siblings in self.children.values():
            siblings.sort(key=lambda s: (s.start_ns, s.span_id))
        endpoint = endpoint_of(self.root) if self.root is not None else None
        self.route = endpoint.name if endpoint is not None else (self.root.name if self.root else "")
        self.trace_id = spans[0].trace_id

    @property
    def duration_ms(self) -> float:
        return self.root.duration_ms if self.root is not None else 0.0

    def sequential_calls(self) -> list[_Hit]:
        hits = []
        for parent_id, siblings in self.children.items():
            calls = [s for s in siblings if _is_call(s)]
            for run in _back_to_back(calls):
                if len(run) < MIN_RUN or len({_signature(s) for s in run}) < len(run):
                    continue  # a repeated statement is a loop or N+1, not independent calls
                durations = [s.duration_ms for s in run]
                saving = sum(durations) - max(durations)
                names = tuple(_signature(s) for s in run)
                hits.append(
                    _Hit(
                        (self._name_of(parent_id), *names),
                        f"{run[0].service}: {self._name_of(parent_id)} → "
                        + ", then ".join(names)
                        + _code(run[0]),
                        saving,
                        {"calls": len(run), "sum_ms": sum(durations), "max_ms": max(durations)},
                    )
                )
        return hits

    def repeated_calls(self) -> list[_Hit]:
        calls: dict[str, list[Span]] = defaultdict(list)
        for span in self.spans:
            if _is_call(span):
                calls[_signature(span)].append(span)
        hits = []
        for signature, spans in calls.items():
            if len(spans) >= MIN_REPEATS:
                durations = [s.duration_ms for s in spans]
                hits.append(
                    _Hit(
                        (signature,),
                        f"{spans[0].service}: {signature}{_code(spans[0])}",
                        sum(durations) - max(durations),
                        {"calls": len(spans), "sum_ms": sum(durations)},
                    )
                )
        return hits

    def serial_loops(self) -> list[_Hit]:
        hits = []
        for parent_id, siblings in self.children.items():
            by_name: dict[str, list[Span]] = defaultdict(list)
            for span in siblings:
                if not _is_call(span):
                    by_name[span.name].append(span)
            for name, steps in by_name.items():
                for run in _back_to_back(steps):
                    durations = [s.duration_ms for s in run]
                    if len(run) < MIN_LOOP or statistics.fmean(durations) < MIN_SAVING_MS:
                        continue
                    if statistics.pstdev(durations) > LOOP_SPREAD * statistics.fmean(durations):
                        continue
                    rounds = math.ceil(len(run) / CONCURRENCY)
                    saving = sum(durations) - rounds * max(durations)
                    hits.append(
                        _Hit(
                            (self._name_of(parent_id), name),
                            f"{run[0].service}: {self._name_of(parent_id)} → {name} x{len(run)}"
                            + _code(run[0]),
                            saving,
                            {
                                "steps": len(run),
                                "mean_ms": statistics.fmean(durations),
                                "sum_ms": sum(durations),
                            },
                        )
                    )
        return hits

    def blocking_fetches(self) -> list[tuple[Span, bool]]:
        """Outgoing HTTP calls the request waited for: on its path (nothing else ran beside them
        under their parent), and whether a deadline shows on the span."""
        found = []
        for siblings in self.children.values():
            for span in siblings:
                if not _is_outgoing_http(span):
                    continue
                beside = [
                    s
                    for s in siblings
                    if s is not span and s.start_ns < span.end_ns and span.start_ns < s.end_ns
                ]
                if not beside:
                    found.append((span, any("timeout" in key for key in span.attributes)))
        return found

    def origin_of_error(self) -> Span | None:
        """The deepest failed span: where the error began (its ancestors only passed it on)."""
        failed = [s for s in self.spans if is_error(s)]
        if not failed:
            return None
        failed_ids = {s.span_id for s in failed}
        leaves = [
            s for s in failed if not any(c.span_id in failed_ids for c in self.children.get(s.span_id, ()))
        ]
        return max(leaves, key=lambda s: (self._depth(s), s.start_ns))

    def self_time(self) -> dict[str, float]:
        """Milliseconds of each span name not covered by its children, over the trace."""
        spent: dict[str, float] = defaultdict(float)
        for span in self.spans:
            covered = _covered_ms(span, self.children.get(span.span_id, ()))
            spent[span.name] += max(0.0, span.duration_ms - covered)
        return spent

    def _depth(self, span: Span) -> int:
        by_id = {s.span_id: s for s in self.spans}
        depth, current = 0, span
        while current.parent_id is not None and current.parent_id in by_id and depth < len(by_id):
            current, depth = by_id[current.parent_id], depth + 1
        return depth

    def _name_of(self, span_id: str) -> str:
        for span in self.spans:
            if span.span_id == span_id:
                return span.name
        return "?"


# Across traces


def _grouped(
    route: str, trees: Sequence[Tree], kind: str, hits_of: Callable[[Tree], list[_Hit]]
) -> list[Finding]:
    found: dict[tuple[str, ...], list[tuple[Tree, _Hit]]] = defaultdict(list)
    for tree in trees:
        for hit in hits_of(tree):
            found[hit.key].append((tree, hit))
    findings = []
    for occurrences in found.values():
        saving = statistics.fmean(hit.saving_ms for _, hit in occurrences)
        if saving < MIN_SAVING_MS:
            continue
        first = occurrences[0][1]
        evidence = {
            name: statistics.fmean(hit.evidence[name] for _, hit in occurrences) for name in first.evidence
        }
        findings.append(
            Finding(
                kind=kind,
                route=route,
                location=first.location,
                evidence=_EVIDENCE[kind](evidence),
                recommendation=_ADVICE[kind],
                saving_ms=saving,
                occurrences=len({tree.trace_id for tree, _ in occurrences}),
                traces=len(trees),
                exemplars=_exemplars(occurrences),
                candidate=kind == "sequential_calls",
                extra=evidence,
            )
        )
    return findings


def _blocking_fetches(route: str, trees: Sequence[Tree]) -> list[Finding]:
    fetches: dict[str, list[tuple[Tree, Span, bool]]] = defaultdict(list)
    for tree in trees:
        for span, deadline in tree.blocking_fetches():
            fetches[_signature(span)].append((tree, span, deadline))
    findings = []
    for signature, seen in fetches.items():
        durations = sorted(span.duration_ms for _, span, _ in seen)
        saving = statistics.fmean(durations)
        if saving < MIN_SAVING_MS:
            continue
        route_p95 = percentile(sorted(t.duration_ms for t in trees), 95)
        in_tail = sum(1 for tree, _, _ in seen if tree.duration_ms >= route_p95)
        share = statistics.fmean(span.duration_ms / max(tree.duration_ms, 1e-9) for tree, span, _ in seen)
        deadline = any(d for _, _, d in seen)
        p50, p95 = percentile(durations, 50), percentile(durations, 95)
        evidence = (
            f"the request waits for it: p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {durations[-1]:.0f} ms; "
            f"{share:.0%} of its request's time; in {in_tail} of the route's slowest 5 %; "
            + ("a timeout shows on the span" if deadline else "no deadline shows on the span")
        )
        span = seen[0][1]
        findings.append(
            Finding(
                kind="blocking_fetch",
                route=route,
                location=f"{span.service}: {signature}{_code(span)}",
                evidence=evidence,
                recommendation=_ADVICE["blocking_fetch"] + ("" if deadline else " Give it a deadline."),
                saving_ms=saving,
                occurrences=len({tree.trace_id for tree, _, _ in seen}),
                traces=len(trees),
                exemplars=_exemplars([(tree, None) for tree, _, _ in seen]),
                extra={"p50_ms": p50, "p95_ms": p95, "deadline": deadline},
            )
        )
    return findings


def _failing(route: str, trees: Sequence[Tree]) -> list[Finding]:
    failed = [
        (tree, origin)
        for tree in trees
        if tree.root is not None and is_error(tree.root) and (origin := tree.origin_of_error())
    ]
    if not failed:
        return []
    causes: dict[tuple[str, str, str], list[tuple[Tree, Span]]] = defaultdict(list)
    for tree, origin in failed:
        message = _NUMBERS.sub("N", origin.status_message or "")
        message = message.removeprefix(f"{origin.exception}: ") if origin.exception else message
        causes[(origin.name, origin.exception or "", message)].append((tree, origin))
    findings = []
    for (name, exception, message), seen in sorted(causes.items(), key=lambda item: -len(item[1])):
        origin = seen[0][1]
        starts = [tree.root.start_ns for tree, _ in seen if tree.root is not None]
        passed = statistics.fmean(sum(1 for s in tree.spans if is_error(s)) - 1 for tree, _ in seen)
        findings.append(
            Finding(
                kind="failing_route",
                route=route,
                location=f"{origin.service}: {name}{_code(origin)}",
                evidence=(
                    f"{len(seen)} of {len(trees)} requests failed ({len(seen) / len(trees):.0%}), "
                    f"beginning at {name}: {exception or 'error'}{': ' + message if message else ''}; "
                    f"passed up through {passed:.1f} more span(s) on average; "
                    f"first {_clock(min(starts))}, last {_clock(max(starts))}"
                ),
                recommendation=_ADVICE["failing_route"],
                saving_ms=0.0,
                occurrences=len(seen),
                traces=len(trees),
                exemplars=_exemplars([(tree, None) for tree, _ in seen]),
                extra={"error_rate": len(seen) / len(trees), "exception": exception, "message": message},
            )
        )
    return findings


def _long_tail(route: str, trees: Sequence[Tree]) -> list[Finding]:
    durations = sorted(tree.duration_ms for tree in trees)
    if len(durations) < 5:
        return []
    p50, worst = percentile(durations, 50), durations[-1]
    if worst < TAIL_RATIO * max(p50, 1e-3) or worst - p50 < MIN_TAIL_MS:
        return []
    slowest = sorted(trees, key=lambda t: -t.duration_ms)[: max(1, len(trees) // 20)]
    spent: dict[str, float] = defaultdict(float)
    for tree in slowest:
        for name, ms in tree.self_time().items():
            spent[name] += ms
    top = sorted(spent.items(), key=lambda item: -item[1])[:3]
    total = sum(spent.values()) or 1.0
    where = ", ".join(f"{name} {ms / total:.0%}" for name, ms in top)
    return [
        Finding(
            kind="long_tail",
            route=route,
            location=f"{trees[0].root.service if trees[0].root else '?'}: {route}",
            evidence=(
                f"p50 {p50:.0f} ms, max {worst:.0f} ms ({worst / max(p50, 1e-3):.0f}x); "
                f"the slowest spend their time in {where}"
            ),
            recommendation=_ADVICE["long_tail"],
            saving_ms=worst - p50,
            occurrences=len(slowest),
            traces=len(trees),
            exemplars=tuple(t.trace_id for t in slowest[:3]),
            extra={"p50_ms": p50, "max_ms": worst},
        )
    ]


# Helpers


def _is_call(span: Span) -> bool:
    """A call to another process: a database statement, an RPC or an outgoing HTTP request."""
    attrs = span.attributes
    return span.kind == "client" or "db.system" in attrs or "db.system.name" in attrs


def _is_outgoing_http(span: Span) -> bool:
    attrs = span.attributes
    return (
        span.kind == "client"
        and ("http.request.method" in attrs or "http.method" in attrs)
        and "rpc.system" not in attrs
    )


def _signature(span: Span) -> str:
    """What makes two calls the same call: the statement, the URL's host and path, or the method."""
    attrs = span.attributes
    statement = attrs.get("db.query.text") or attrs.get("db.statement")
    if statement:
        return _NUMBERS.sub("?", " ".join(str(statement).split()))[:120]
    url = attrs.get("url.full") or attrs.get("http.url")
    if url:
        method = attrs.get("http.request.method") or attrs.get("http.method") or ""
        return f"{method} {str(url).split('?', 1)[0]}".strip()
    return span.name


def _code(span: Span) -> str:
    function, path, line = (span.attributes.get(k) for k in ("code.function", "code.filepath", "code.lineno"))
    if not (function or path):
        return ""
    return f" ({path or ''}{':' + str(line) if line else ''}{' ' + str(function) if function else ''})"


def _back_to_back(spans: Sequence[Span]) -> Iterable[list[Span]]:
    """Runs of spans (by start) each starting after the one before ended, within MAX_GAP_MS."""
    run: list[Span] = []
    for span in spans:
        if run and (span.start_ns < run[-1].end_ns or (span.start_ns - run[-1].end_ns) / 1e6 > MAX_GAP_MS):
            yield run
            run = []
        run.append(span)
    if run:
        yield run


def _covered_ms(span: Span, children: Iterable[Span]) -> float:
    intervals = sorted((max(c.start_ns, span.start_ns), min(c.end_ns, span.end_ns)) for c in children)
    covered, cursor = 0, span.start_ns
    for start, end in intervals:
        start = max(start, cursor)
        if end > start:
            covered += end - start
            cursor = end
    return covered / 1e6


def _exemplars(occurrences: Sequence[tuple[Tree, object]]) -> tuple[str, ...]:
    slowest = sorted({tree.trace_id: tree for tree, _ in occurrences}.values(), key=lambda t: -t.duration_ms)
    return tuple(tree.trace_id for tree in slowest[:3])


def _clock(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


_EVIDENCE = {
    "sequential_calls": lambda e: (
        f"{e['calls']:.0f} calls one after another, {e['sum_ms']:.0f} ms in all, "
        f"the longest {e['max_ms']:.0f} ms"
    ),
    "repeated_calls": lambda e: f"{e['calls']:.0f} calls of it in one request, {e['sum_ms']:.0f} ms in all",
    "serial_loop": lambda e: (
        f"{e['steps']:.0f} steps one after another, {e['mean_ms']:.0f} ms each, {e['sum_ms']:.0f} ms in all"
    ),
}

_ADVICE = {
    "sequential_calls": "If they do not depend on each other, run them together (asyncio.gather, one "
    "round trip, a pipeline); candidate: the traces show their order, not their independence.",
    "repeated_calls": "Fetch them in one call (a join, WHERE id = ANY(...), a batch endpoint) or cache them.",
    "serial_loop": f"Run the steps concurrently, at most {CONCURRENCY} at a time (a semaphore, a "
    "task group).",
    "blocking_fetch": "Fetch it ahead (when the request is accepted) or in the background, and cache it.",
    "failing_route": "Fix the cause at the span where it begins; the spans above it only passed it on.",
    "long_tail": "Bound the slow part (a deadline, a timeout) and look at the exemplar traces.",
}
