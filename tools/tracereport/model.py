"""Spans read from OTLP/JSON lines (one ExportTraceServiceRequest per line), streamed file by file.

Accepts what `shared.telemetry.JsonLinesSpanExporter` writes and what a collector's `file` exporter
writes: ids in hex (or base64), enums as names or numbers, int64 values as strings or numbers.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias, cast

import zstandard

Scalar: TypeAlias = str | int | float | bool
AttributeValue: TypeAlias = Scalar | tuple[Scalar, ...]

_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUSES = ("unset", "ok", "error")


@dataclass(frozen=True, slots=True)
class Link:
    """A span another span points to (the submitting request of a background job)."""

    trace_id: str
    span_id: str


@dataclass(frozen=True, slots=True)
class Span:
    """One finished span, reduced to what the reports use."""

    trace_id: str
    span_id: str
    parent_id: str | None
    """The parent's span id, None for a root (the parent may still be missing from the input)."""
    name: str
    service: str
    """The `service.name` of the resource that emitted it."""
    kind: str
    """One of unspecified, internal, server, client, producer, consumer."""
    start_ns: int
    end_ns: int
    status: str
    """One of unset, ok, error."""
    status_message: str
    attributes: Mapping[str, AttributeValue]
    links: tuple[Link, ...] = ()
    exception: str | None = None
    """The type of the first exception recorded on the span, if any."""

    @property
    def duration_ms(self) -> float:
        """Milliseconds from start to end (never negative)."""
        return max(0, self.end_ns - self.start_ns) / 1e6

    @property
    def failed(self) -> bool:
        """Whether the span ended with an error status."""
        return self.status == "error"


@dataclass
class ReadCounts:
    """What reading the inputs met, for the report's footer."""

    files: int = 0
    lines: int = 0
    bad_lines: int = 0
    """Lines that are not an OTLP/JSON request (truncated, garbage): skipped."""
    bad_spans: int = 0
    """Spans without ids or times: skipped."""
    spans: int = 0
    """Spans read, before any filter."""
    first_bad: str | None = None
    """Where the first bad line is (`file:line`)."""


def read_spans(paths: Iterable[Path], counts: ReadCounts, since_ns: int | None = None) -> Iterator[Span]:
    """The spans in `paths` (plain, `.gz` or `.zst`), line by line, skipping (and counting) lines
    that do not parse (a truncated last line among them) and, when `since_ns` is given, spans that
    started before it. Blank lines are ignored. A file that is one JSON document over several lines
    (a request, or a list of them) is read as such."""
    for path in paths:
        counts.files += 1
        with _opened(path) as lines:
            requests = _requests(path, lines, counts)
            for spans, bad in requests:
                counts.bad_spans += bad
                counts.spans += len(spans)
                for span in spans:
                    if since_ns is None or span.start_ns >= since_ns:
                        yield span


def _opened(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return cast(IO[bytes], gzip.open(path, "rb"))
    if path.suffix == ".zst":
        # zstandard's reader reads, but not by line: a buffered reader over it does.
        reader = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.BufferedReader(cast(io.RawIOBase, reader))
    return path.open("rb")


def _requests(path: Path, stream: IO[bytes], counts: ReadCounts) -> Iterator[tuple[list[Span], int]]:
    """The decoded requests of a file: one per line, or the whole file's one document."""
    pending: list[bytes] = []
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        if pending:  # within a document of many lines
            pending.append(raw)
            continue
        counts.lines += 1
        try:
            yield parse_request(json.loads(raw))
        except (ValueError, TypeError, AttributeError, KeyError):
            if number == 1 and raw.lstrip()[:1] in (b"{", b"["):
                pending.append(raw)  # perhaps the first line of a pretty-printed document
                continue
            counts.bad_lines += 1
            counts.first_bad = counts.first_bad or f"{path}:{number}"
    if pending:
        try:
            document = json.loads(b"".join(pending))
            for request in document if isinstance(document, list) else [document]:
                yield parse_request(request)
        except (ValueError, TypeError, AttributeError, KeyError):
            counts.bad_lines += 1
            counts.first_bad = counts.first_bad or f"{path}:1"


def parse_request(request: Any) -> tuple[list[Span], int]:
    """The spans of one decoded ExportTraceServiceRequest and the number of malformed spans in it;
    ValueError if it is not one at all."""
    if not isinstance(request, dict) or not isinstance(request.get("resourceSpans"), list):
        raise ValueError("not an ExportTraceServiceRequest")
    spans: list[Span] = []
    bad = 0
    for resource_spans in request["resourceSpans"]:
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
        service = str(resource.get("service.name", "unknown"))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for raw in scope_spans.get("spans", []):
                try:
                    span = _span(raw, service)
                except (ValueError, TypeError, AttributeError, KeyError):
                    span = None
                if span is None:
                    bad += 1
                else:
                    spans.append(span)
    return spans, bad


def _span(raw: Any, service: str) -> Span | None:
    if not isinstance(raw, dict):
        return None
    trace_id = _id(raw.get("traceId"), 16)
    span_id = _id(raw.get("spanId"), 8)
    start_ns = int(raw["startTimeUnixNano"])
    end_ns = int(raw.get("endTimeUnixNano", start_ns))
    if trace_id is None or span_id is None:
        return None
    status = raw.get("status") or {}
    links = tuple(
        Link(link_trace, link_span)
        for link in raw.get("links", [])
        if (link_trace := _id(link.get("traceId"), 16)) and (link_span := _id(link.get("spanId"), 8))
    )
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=_id(raw.get("parentSpanId"), 8),
        name=str(raw.get("name", "")),
        service=service,
        kind=_enum(raw.get("kind"), "SPAN_KIND_", _KINDS),
        start_ns=start_ns,
        end_ns=end_ns,
        status=_enum(status.get("code"), "STATUS_CODE_", _STATUSES),
        status_message=str(status.get("message", "")),
        attributes=_attributes(raw.get("attributes", [])),
        links=links,
        exception=_exception(raw.get("events", [])),
    )


def _id(value: Any, size: int) -> str | None:
    """A span or trace id as lowercase hex; base64 (protobuf's JSON default) is accepted too."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) == size * 2:
        try:
            bytes.fromhex(value)
        except ValueError:
            pass
        else:
            return None if value.strip("0") == "" else value.lower()
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.hex() if len(decoded) == size and any(decoded) else None


def _enum(value: Any, prefix: str, names: tuple[str, ...]) -> str:
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str):
        name = value.removeprefix(prefix).lower()
        if name in names:
            return name
        if name.isdigit() and int(name) < len(names):
            return names[int(name)]
    return names[0]


def _attributes(raw: Any) -> dict[str, AttributeValue]:
    result: dict[str, AttributeValue] = {}
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            value = _value(item.get("value") or {})
            if value is not None:
                result[item["key"]] = value
    return result


def _value(raw: Mapping[str, Any]) -> AttributeValue | None:
    if "stringValue" in raw:
        return str(raw["stringValue"])
    if "boolValue" in raw:
        return bool(raw["boolValue"])
    if "intValue" in raw:
        return int(raw["intValue"])
    if "doubleValue" in raw:
        return float(raw["doubleValue"])
    if "arrayValue" in raw:
        items = (_value(item) for item in raw["arrayValue"].get("values", []))
        return tuple(item for item in items if item is not None and not isinstance(item, tuple))
    if "kvlistValue" in raw:
        return json.dumps(raw["kvlistValue"], sort_keys=True)
    if "bytesValue" in raw:
        return str(raw["bytesValue"])
    return None


def _exception(events: Any) -> str | None:
    for event in events if isinstance(events, list) else []:
        if isinstance(event, dict) and event.get("name") == "exception":
            attributes = _attributes(event.get("attributes", []))
            return str(attributes.get("exception.type", "exception"))
    return None
