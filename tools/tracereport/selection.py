"""Which spans a report covers: the `--since`, `--route` and `--service` filters, and the traces
linked to the ones they pick."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tools.tracereport.model import ReadCounts, Span, read_spans
from tools.tracereport.stats import endpoint_of
from tools.tracereport.traces import linked_closure

_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)"
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Filters:
    """What to report on; an empty filter keeps everything."""

    since: datetime | None = None
    """Spans that started before this are left out."""
    route: str | None = None
    """A substring of, or a glob on, an endpoint name (`POST /v1/renders`, `GenerationService/Submit`)."""
    services: tuple[str, ...] = ()
    """Service names (`service.name`)."""
    trace_id: str | None = None
    """One trace (with the traces linked to it)."""
    render_id: str | None = None
    """The traces of one render: its submit and its jobs (spans with `render.id`)."""

    @property
    def picks_traces(self) -> bool:
        """Whether the filters pick traces (and so the spans must be read twice)."""
        return self.route is not None or bool(self.services) or bool(self.trace_id or self.render_id)

    def describe(self) -> str:
        """The filters in force, for a report's heading; empty when there are none."""
        chosen = [
            f"since {self.since.isoformat()}" if self.since else "",
            f"route {self.route}" if self.route else "",
            f"service {', '.join(self.services)}" if self.services else "",
            f"trace {self.trace_id}" if self.trace_id else "",
            f"render {self.render_id}" if self.render_id else "",
        ]
        return "; ".join(c for c in chosen if c)

    def matches(self, span: Span) -> bool:
        """Whether the span is one the filters ask for: an endpoint matching the route, of one of
        the services. Its trace (and the traces linked to it) go into the report."""
        if self.trace_id is not None and span.trace_id != self.trace_id.lower():
            return False
        if self.render_id is not None and span.attributes.get("render.id") != self.render_id:
            return False
        if self.services and span.service not in self.services:
            return False
        if self.route is None:
            return True
        endpoint = endpoint_of(span)
        if endpoint is None:
            return False
        names = (endpoint.name, span.name)
        if any(char in self.route for char in "*?["):
            return any(fnmatch.fnmatchcase(name, self.route) for name in names)
        return any(self.route in name for name in names)


def load_spans(paths: Sequence[Path], filters: Filters, counts: ReadCounts) -> list[Span]:
    """The spans of `paths` that the report covers.

    With `--route` or `--service`, a first pass finds the traces with a matching span, and the
    traces linked to them, so that the second pass keeps only their spans (memory stays in
    proportion to what is kept, whatever the size of the files).
    """
    since_ns = int(filters.since.timestamp() * 1e9) if filters.since is not None else None
    if not filters.picks_traces:
        return list(read_spans(paths, counts, since_ns))
    seeds: set[str] = set()
    links: set[tuple[str, str]] = set()
    for span in read_spans(paths, ReadCounts(), since_ns):
        if span.trace_id not in seeds and filters.matches(span):
            seeds.add(span.trace_id)
        links.update((span.trace_id, link.trace_id) for link in span.links)
    wanted = linked_closure(seeds, links)
    return [span for span in read_spans(paths, counts, since_ns) if span.trace_id in wanted]


def parse_since(value: str, now: datetime) -> datetime:
    """An RFC 3339 time (`2024-05-01T12:00:00Z`) or a duration back from `now` (`15m`, `2h`,
    `1h30m`); ValueError otherwise."""
    if re.fullmatch(f"(?:{_PART})+", value):
        seconds = sum(float(n) * _UNIT[unit] for n, unit in re.findall(_PART, value))
        return now - timedelta(seconds=seconds)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone (add Z or an offset)")
    return moment
