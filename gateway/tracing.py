"""Server spans for incoming requests (continuing the client's `traceparent`) and the W3C context
of the current span for responses."""

from __future__ import annotations

import warnings
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.instrumentation import aiohttp_server
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.http import (
    OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST,
    get_custom_headers,
)
from yarl import URL

from gateway.openapi import PATHS, query_parameters

_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_middleware(tracer_provider: trace.TracerProvider | None = None) -> Any:
    """The OpenTelemetry aiohttp server middleware, added explicitly to the application.

    The middleware reads module state (tracer, meters, excluded URLs) that only the instrumentor's
    `instrument()` sets up; `instrument()` also replaces `web.Application` with a subclass that
    adds the middleware to every application. Run it once and undo the replacement at once, so
    that the middleware is exactly where we put it.
    """
    instrumentor = aiohttp_server.AioHttpServerInstrumentor()
    if getattr(aiohttp_server, "_excluded_urls", None) is None and not (
        instrumentor.is_instrumented_by_opentelemetry
    ):
        with warnings.catch_warnings():
            # The subclass it builds (and we discard) draws aiohttp's "inheritance is discouraged".
            warnings.filterwarnings("ignore", "Inheritance class", DeprecationWarning)
            instrumentor.instrument(skip_dep_check=True)
        instrumentor.uninstrument()
        # Its request durations carry no route (the gateway's own do: gateway.routes.metrics) and
        # the meter provider drops them; not recording them at all saves a measurement per request.
        aiohttp_server.duration_histogram_old = None
        aiohttp_server.duration_histogram_new = None
        # What a request span records of the URL and headers goes through our allow-lists: the
        # instrumentation's own redaction knows only a few cloud providers' signature parameters,
        # and a client may put a key anywhere (`?api_key=...`).
        for name, replacement in (
            ("redact_query_parameters", redact_query),
            ("redact_url", redact_url),
            ("collect_request_headers_attributes", _allowed_request_headers),
        ):
            setattr(aiohttp_server, name, replacement)
    return aiohttp_server.create_aiohttp_middleware(tracer_provider=tracer_provider)


QUERY_ALLOWED = frozenset(
    name
    for operations in PATHS.values()
    for operation in operations.values()
    for name in query_parameters(operation["operationId"])
)
"""Query parameters recorded as sent: the API's own (none is a secret). Others' values are not."""
HEADERS_ALLOWED = frozenset(
    {"accept", "content-type", "content-length", "user-agent", "prefer", "range", "if-none-match"}
)
"""Request headers a span may record, when `OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST`
asks for them; Authorization, cookies and the WebSocket subprotocols (a key rides there) never."""
REDACTED = "REDACTED"


def redact_query(url: str) -> str:
    """A path and query (or URL) with the value of every parameter off the allow-list replaced."""
    parsed = URL(url, encoded=True)
    if not parsed.query_string:
        return url
    kept = [(name, value if name in QUERY_ALLOWED else REDACTED) for name, value in parsed.query.items()]
    return str(parsed.with_query(kept))


def redact_url(url: str) -> str:
    """A URL without credentials, its query redacted as `redact_query` does."""
    return redact_query(str(URL(url, encoded=True).with_user(None)))


def _allowed_request_headers(request: web.Request) -> dict[str, list[str]]:
    wanted = get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST)
    return {
        f"http.request.header.{name.lower().replace('-', '_')}": request.headers.getall(name)
        for name in wanted
        if name.lower() in HEADERS_ALLOWED and name in request.headers
    }


def current_traceparent() -> str | None:
    """The `traceparent` of the current span, or None outside a valid trace."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits), or None outside a valid trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
