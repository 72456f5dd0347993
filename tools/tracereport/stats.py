"""Latency statistics and the grouping of spans into endpoints, phases and error causes (pure)."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from shared.contract import PHASE_ATTRIBUTE_PREFIX, PHASES, WAIT
from shared.spans import STREAM_ATTRIBUTE
from tools.tracereport.model import AttributeValue, Span

PER_KIND_PHASES = frozenset({"generation"})
"""Phases reported per `render.kind` (an image and a video take very different times)."""

GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
_REASON_KEYS = ("failure.reason", "error.code", "imagefetch.failure_reason", "error.type")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_OPAQUE = re.compile(r"\d+|[0-9a-fA-F]{16,}|(?=[A-Za-z]*\d)[A-Za-z0-9]{20,}")
_GRPC_NAME = re.compile(r"/?([\w.]+)/(\w+)")
# Histogram edges: 1, 1.5, 2, 3, 5, 7 per decade, from 0.1 ms to about 3 hours.
_EDGES = tuple(m * 10.0**e for e in range(-1, 7) for m in (1, 1.5, 2, 3, 5, 7))


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, interpolating linearly between the closest
    ranks (numpy's default); 0 for no values."""
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Bin:
    """Durations in [lo_ms, hi_ms)."""

    lo_ms: float
    hi_ms: float
    count: int


@dataclass(frozen=True)
class Summary:
    """Count and latency figures (milliseconds) of a group of spans."""

    count: int
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    histogram: tuple[Bin, ...] = field(default=(), repr=False)
    """Log-spaced bins from the one holding the fastest span to the one holding the slowest."""

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        """The summary of these durations."""
        ordered = sorted(values)
        if not ordered:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            count=len(ordered),
            avg_ms=sum(ordered) / len(ordered),
            p50_ms=percentile(ordered, 50),
            p95_ms=percentile(ordered, 95),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1],
            histogram=histogram(ordered),
        )


def histogram(ordered: Sequence[float]) -> tuple[Bin, ...]:
    """Sorted durations counted in log-spaced bins, trimmed to the range they occupy."""
    if not ordered:
        return ()
    edges = (0.0, *_EDGES, math.inf)
    counts = [0] * (len(edges) - 1)
    index = 0
    for value in ordered:
        while value >= edges[index + 1]:
            index += 1
        counts[index] += 1
    used = [i for i, count in enumerate(counts) if count]
    return tuple(Bin(edges[i], edges[i + 1], counts[i]) for i in range(used[0], used[-1] + 1))


@dataclass(frozen=True, order=True)
class Endpoint:
    """What an HTTP or RPC span served or called, named as the report shows it."""

    protocol: str
    """http or grpc."""
    side: str
    """server or client."""
    name: str
    """`POST /v1/renders` (method and route template) or `GenerationService/Submit`."""


def endpoint_of(span: Span) -> Endpoint | None:
    """The HTTP route a server span served or the RPC method a span served or called; None for
    other spans (phases, SQL, outgoing HTTP)."""
    attrs = span.attributes
    method = _first(attrs, "http.request.method", "http.method")
    if span.kind == "server" and method is not None:
        return Endpoint("http", "server", f"{str(method).upper()} {_http_route(span, str(method))}")
    if span.kind not in ("server", "client"):
        return None
    named = _GRPC_NAME.fullmatch(span.name)
    service = attrs.get("rpc.service") or (named.group(1) if named else None)
    rpc_method = attrs.get("rpc.method") or (named.group(2) if named else None)
    if service is None or rpc_method is None or (named is None and attrs.get("rpc.system") != "grpc"):
        return None
    return Endpoint("grpc", span.kind, f"{str(service).rsplit('.', 1)[-1]}/{rpc_method}")


def _http_route(span: Span, method: str) -> str:
    route = span.attributes.get("http.route")
    if route:
        return str(route)
    target = _first(span.attributes, "url.path", "http.target")
    if target is None:
        target = span.name.removeprefix(method).strip() or "?"
    return collapse_ids(str(target).split("?", 1)[0])


def collapse_ids(path: str) -> str:
    """The path with ids (UUIDs, numbers, long hex or opaque tokens) replaced by `{id}`, so that
    requests for different resources group under one route."""
    segments = []
    for segment in _UUID.sub("{id}", path).split("/"):
        head, colon, verb = segment.partition(":")  # keep custom verbs such as `:cancel`
        segments.append(("{id}" if _OPAQUE.fullmatch(head) else head) + colon + verb)
    return "/".join(segments)


def http_status(span: Span) -> int | None:
    """The HTTP response status code of a span, if it has one."""
    return _int(_first(span.attributes, "http.response.status_code", "http.status_code"))


def grpc_code(span: Span) -> int | None:
    """The gRPC status code of a span, if it has one."""
    return _int(span.attributes.get("rpc.grpc.status_code"))


@dataclass(frozen=True)
class EndpointStats:
    """Latency and errors of one endpoint."""

    endpoint: Endpoint
    summary: Summary
    errors: int
    """HTTP 5xx, or gRPC calls that did not end OK."""
    client_errors: int
    """HTTP 4xx (always 0 for gRPC)."""
    stream: bool = False
    """Answered with a stream (events, a subscription): its durations are how long someone listened."""

    @property
    def error_rate(self) -> float:
        """Share of `errors` in the calls."""
        return self.errors / self.summary.count if self.summary.count else 0.0

    @property
    def client_error_rate(self) -> float:
        """Share of `client_errors` in the calls."""
        return self.client_errors / self.summary.count if self.summary.count else 0.0


def endpoint_stats(
    spans: Iterable[Span], keep: Callable[[Span], bool] = lambda _: True
) -> list[EndpointStats]:
    """Per endpoint: HTTP routes, then RPC methods served, then RPC methods called; busiest first."""
    groups: dict[Endpoint, list[Span]] = defaultdict(list)
    for span in spans:
        endpoint = endpoint_of(span)
        if endpoint is not None and keep(span):
            groups[endpoint].append(span)
    result = []
    for endpoint, members in groups.items():
        errors = client_errors = 0
        for span in members:
            if endpoint.protocol == "http":
                status = http_status(span)
                errors += status >= 500 if status is not None else span.failed
                client_errors += status is not None and 400 <= status < 500
            else:
                code = grpc_code(span)
                errors += code != 0 if code is not None else span.failed
        summary = Summary.of(span.duration_ms for span in members)
        stream = any(span.attributes.get(STREAM_ATTRIBUTE) is True for span in members)
        result.append(EndpointStats(endpoint, summary, errors, client_errors, stream))
    # The server marks a stream; the calls made to it are streams as well.
    streamed = {s.endpoint.name for s in result if s.stream and s.endpoint.protocol == "grpc"}
    result = [
        replace(s, stream=True) if s.endpoint.protocol == "grpc" and s.endpoint.name in streamed else s
        for s in result
    ]
    order = {("http", "server"): 0, ("grpc", "server"): 1, ("grpc", "client"): 2}
    result.sort(key=lambda s: (order[s.endpoint.protocol, s.endpoint.side], -s.summary.count, s.endpoint))
    return result


@dataclass(frozen=True)
class PhaseStats:
    """Latency of one phase against its budget."""

    phase: str
    """The phase, with the render kind for phases reported per kind: `generation (video)`."""
    summary: Summary
    budget_ms: float | None
    over_budget: int
    """Spans slower than the budget."""

    @property
    def p95_over_budget(self) -> bool:
        """Whether the phase's p95 is over its budget: the mark of a phase to look at."""
        return self.budget_ms is not None and self.summary.p95_ms > self.budget_ms


def phase_of(span: Span, phases: Iterable[str]) -> str | None:
    """The phase a span times: its name when that is a phase, or its `renderflow.phase` attribute."""
    if span.name in phases:
        return span.name
    phase = span.attributes.get("renderflow.phase")
    return str(phase) if phase is not None else None


def _phases_timed(span: Span, names: Iterable[str]) -> Iterator[tuple[str, float]]:
    """The phases `span` times and their milliseconds: the span itself when it is a phase's, and
    each phase recorded as an attribute of it (`renderflow.phases.<phase>_ms`: the request phases)."""
    if (phase := phase_of(span, names)) is not None:
        yield phase, span.duration_ms
    for key, value in span.attributes.items():
        if key.startswith(PHASE_ATTRIBUTE_PREFIX) and key.endswith("_ms") and isinstance(value, int | float):
            yield key[len(PHASE_ATTRIBUTE_PREFIX) : -len("_ms")], float(value)


def phase_stats(
    spans: Iterable[Span], budgets: Mapping[str, float], kind_of: Callable[[Span], str | None]
) -> list[PhaseStats]:
    """Per phase (per render kind where that matters), in the order a render goes through them, the
    gateway's wait for its end last; `kind_of` finds a span's render kind (on it or an ancestor)."""
    known = (*PHASES, WAIT)
    names = (*known, *sorted(set(budgets) - set(known)))
    groups: dict[tuple[int, str, str], list[float]] = defaultdict(list)
    for span in spans:
        for phase, duration_ms in _phases_timed(span, names):
            label = phase
            if phase in PER_KIND_PHASES and (kind := kind_of(span)):
                label = f"{phase} ({kind})"
            rank = names.index(phase) if phase in names else len(names)
            groups[rank, phase, label].append(duration_ms)
    result = []
    for (_, phase, label), durations in sorted(groups.items()):
        budget = budgets.get(phase)
        over = sum(d > budget for d in durations) if budget is not None else 0
        result.append(PhaseStats(label, Summary.of(durations), budget, over))
    return result


@dataclass
class ErrorCause:
    """Failures that began at spans of one name, for one reason."""

    span_name: str
    cause: str
    count: int
    """Failures, each counted once, at the span where it began (a failed span with no failed span
    below it), not at every span it passed through on its way up."""
    example_trace_id: str
    services: list[str]
    passed_through: int = 0
    """Failed spans above them: the ones that only passed these failures on."""


def is_error(span: Span) -> bool:
    """Whether the span failed: error status, or an HTTP server span that answered 5xx."""
    status = http_status(span)
    return span.failed or (span.kind == "server" and status is not None and status >= 500)


def error_cause(span: Span) -> str:
    """Why a span failed, as specific as the span says: its failure reason or error code, the gRPC
    or HTTP status, the status message, the exception type."""
    reason = _first(span.attributes, *_REASON_KEYS)
    if reason is not None:
        return str(reason)
    code = grpc_code(span)
    if code:
        return f"grpc {GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else code}"
    status = http_status(span)
    if status is not None and status >= 400:
        return f"HTTP {status}"
    return span.status_message or span.exception or "error"


def error_causes(spans: Iterable[Span]) -> list[ErrorCause]:
    """Failures grouped by (span name, cause) where they began, most frequent first."""
    by_key = {(span.trace_id, span.span_id): span for span in spans}
    failed = {key for key, span in by_key.items() if is_error(span)}
    passed_on = {above for key in failed for above in _ancestors(by_key[key], by_key)}
    causes: dict[tuple[str, str], ErrorCause] = {}
    for key in failed - passed_on:
        span = by_key[key]
        endpoint = endpoint_of(span)
        name = endpoint.name if endpoint is not None else span.name
        key = (name, error_cause(span))
        cause = causes.get(key)
        if cause is None:
            cause = causes[key] = ErrorCause(name, key[1], 0, span.trace_id, [])
        cause.count += 1
        cause.passed_through += _failed_ancestors(span, by_key, failed)
        if span.service not in cause.services:
            cause.services.append(span.service)
    return sorted(causes.values(), key=lambda c: (-c.count, c.span_name, c.cause, c.example_trace_id))


def _failed_ancestors(
    span: Span, by_key: Mapping[tuple[str, str], Span], failed: set[tuple[str, str]]
) -> int:
    return sum(key in failed for key in _ancestors(span, by_key))


def _ancestors(span: Span, by_key: Mapping[tuple[str, str], Span]) -> list[tuple[str, str]]:
    """The keys of the span's ancestors present, nearest first (a failure below any of them, even
    through calls that answered normally, is the one that began it)."""
    found: list[tuple[str, str]] = []
    current = span
    while current.parent_id is not None and (key := (current.trace_id, current.parent_id)) in by_key:
        if key in found:
            break  # a cycle in broken input
        found.append(key)
        current = by_key[key]
    return found


def _first(attrs: Mapping[str, AttributeValue], *keys: str) -> AttributeValue | None:
    for key in keys:
        value = attrs.get(key)
        if value is not None and value != "":
            return value
    return None


def _int(value: AttributeValue | None) -> int | None:
    if isinstance(value, bool) or value is None or isinstance(value, tuple):
        return None
    try:
        return int(value)
    except ValueError:
        return None
