"""Traces as trees: spans under their parents, traces joined by their links, and the waterfalls of
the slowest ones (pure)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from shared.spans import STREAM_ATTRIBUTE
from tools.tracereport.model import AttributeValue, Span
from tools.tracereport.stats import endpoint_of, is_error

_Key = tuple[str, str]


@dataclass(frozen=True)
class WaterfallRow:
    """One span of a waterfall, placed on the waterfall's time axis."""

    depth: int
    name: str
    service: str
    trace_id: str
    offset_ms: float
    """From the start of the waterfall."""
    duration_ms: float
    error: bool
    linked: bool
    """The root of another trace, shown under the span it links to."""


@dataclass(frozen=True)
class Waterfall:
    """A trace and the traces linked to it, span by span in tree order."""

    trace_id: str
    """The trace that started first."""
    trace_ids: tuple[str, ...]
    start_ns: int
    duration_ms: float
    """From the first span's start to the last span's end, over all the traces."""
    span_count: int
    rows: tuple[WaterfallRow, ...]
    hidden: int
    """Spans left out after the row limit."""


class TraceSet:
    """Spans indexed by trace and id (a span read twice counts once)."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self._spans: dict[_Key, Span] = {}
        self.traces: dict[str, list[Span]] = defaultdict(list)
        """Spans per trace id."""
        for span in spans:
            key = (span.trace_id, span.span_id)
            if key not in self._spans:
                self._spans[key] = span
                self.traces[span.trace_id].append(span)

    def __iter__(self) -> Iterator[Span]:
        return iter(self._spans.values())

    def __len__(self) -> int:
        return len(self._spans)

    def parent(self, span: Span) -> Span | None:
        """The span's parent, None for roots and spans whose parent is missing."""
        return self._spans.get((span.trace_id, span.parent_id)) if span.parent_id else None

    def inherited(self, span: Span, key: str) -> AttributeValue | None:
        """The attribute on the span or its nearest ancestor that has it."""
        seen: set[str] = set()
        current: Span | None = span
        while current is not None and current.span_id not in seen:
            value = current.attributes.get(key)
            if value is not None:
                return value
            seen.add(current.span_id)
            current = self.parent(current)
        return None

    def groups(self) -> list[list[str]]:
        """Trace ids joined by links (a background job's trace with the request that submitted it)."""
        leader = {trace_id: trace_id for trace_id in self.traces}

        def find(trace_id: str) -> str:
            while leader[trace_id] != trace_id:
                leader[trace_id] = leader[leader[trace_id]]
                trace_id = leader[trace_id]
            return trace_id

        for span in self:
            for link in span.links:
                if link.trace_id in leader:
                    leader[find(link.trace_id)] = find(span.trace_id)
        members: dict[str, list[str]] = defaultdict(list)
        for trace_id in self.traces:
            members[find(trace_id)].append(trace_id)
        return list(members.values())

    def slowest(self, count: int, max_rows: int) -> tuple[list[Waterfall], int]:
        """Waterfalls of the `count` slowest groups of linked traces, slowest first, leaving out
        streams (how long someone listened says nothing of how long anyone waited); and how many
        streams were left out."""

        def bounds(group: list[str]) -> tuple[int, int]:
            spans = [span for trace_id in group for span in self.traces[trace_id]]
            return min(s.start_ns for s in spans), max(s.end_ns for s in spans)

        groups = self.groups()
        timed = [(bounds(group), group) for group in groups if not self.is_stream(group)]
        timed.sort(key=lambda item: (item[0][0] - item[0][1], item[0][0]))
        return [self.waterfall(group, max_rows) for _, group in timed[:count]], len(groups) - len(timed)

    def is_stream(self, group: list[str]) -> bool:
        """Whether the group began as a stream: its first root span is marked as one, or is a call
        whose server side is (a subscription a process keeps open outside any request)."""
        spans = [span for trace_id in group for span in self.traces[trace_id]]
        roots = [s for s in spans if self.parent(s) is None] or spans  # (spans in a parent cycle)
        root = min(roots, key=lambda s: (s.start_ns, s.span_id))
        if root.attributes.get(STREAM_ATTRIBUTE) is True:
            return True
        return root.kind == "client" and any(
            s.attributes.get(STREAM_ATTRIBUTE) is True and self.parent(s) is root for s in spans
        )

    def waterfall(self, trace_ids: Iterable[str], max_rows: int) -> Waterfall:
        """The spans of these traces in tree order: each under its parent, children by start time,
        a trace's root under the span it links to when that span is here, the rest as roots."""
        spans = sorted(
            (span for trace_id in trace_ids for span in self.traces[trace_id]),
            key=lambda s: (s.start_ns, s.name),
        )
        present = {(s.trace_id, s.span_id) for s in spans}
        children: dict[_Key, list[tuple[Span, bool]]] = defaultdict(list)
        roots = []
        for span in spans:
            if span.parent_id and (span.trace_id, span.parent_id) in present:
                children[span.trace_id, span.parent_id].append((span, False))
                continue
            target = next(
                (
                    (link.trace_id, link.span_id)
                    for link in span.links
                    if link.trace_id != span.trace_id and (link.trace_id, link.span_id) in present
                ),
                None,
            )
            if target is not None:
                children[target].append((span, True))
            else:
                roots.append(span)
        start = spans[0].start_ns
        end = max(s.end_ns for s in spans)
        rows: list[WaterfallRow] = []
        seen: set[_Key] = set()
        # Spans caught in a parent cycle are reached from no root: they start trees of their own.
        for root in [*roots, *spans]:
            stack = [(root, 0, False)]
            while stack:
                span, depth, linked = stack.pop()
                key = (span.trace_id, span.span_id)
                if key in seen:
                    continue
                seen.add(key)
                rows.append(_row(span, depth, linked, start))
                stack.extend((child, depth + 1, via) for child, via in reversed(children[key]))
        order = [span.trace_id for span in spans]
        return Waterfall(
            trace_id=spans[0].trace_id,
            trace_ids=tuple(dict.fromkeys(order)),
            start_ns=start,
            duration_ms=(end - start) / 1e6,
            span_count=len(spans),
            rows=tuple(rows[:max_rows]),
            hidden=max(0, len(rows) - max_rows),
        )


def _row(span: Span, depth: int, linked: bool, start_ns: int) -> WaterfallRow:
    endpoint = endpoint_of(span)
    return WaterfallRow(
        depth=depth,
        name=endpoint.name if endpoint is not None else span.name,
        service=span.service,
        trace_id=span.trace_id,
        offset_ms=(span.start_ns - start_ns) / 1e6,
        duration_ms=span.duration_ms,
        error=is_error(span),
        linked=linked,
    )


def linked_closure(seeds: Iterable[str], links: Iterable[tuple[str, str]]) -> set[str]:
    """The seed trace ids and every trace reachable from them over links, in either direction."""
    neighbours: dict[str, set[str]] = defaultdict(set)
    for a, b in links:
        neighbours[a].add(b)
        neighbours[b].add(a)
    reached = set(seeds)
    frontier = list(reached)
    while frontier:
        for other in neighbours[frontier.pop()] - reached:
            reached.add(other)
            frontier.append(other)
    return reached
