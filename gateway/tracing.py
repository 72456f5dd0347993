"""Server spans for incoming requests (continuing the client's `traceparent`) and the W3C context
of the current span for responses."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.http import (
    OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST,
    get_custom_headers,
)
from yarl import URL

from gateway.conventions import CLIENT_CLOSED
from gateway.openapi import PATHS, query_parameters

_PROPAGATOR = TraceContextTextMapPropagator()


def tracing_middleware(tracer_provider: trace.TracerProvider | None = None) -> Any:
    """A SERVER span for each request, continuing the client's `traceparent`: named `METHOD route`,
    with the request's method, route, path, query (through `redact_query`), user agent, the
    allow-listed headers, and its status (ERROR from 500 on).

    Ours, not OpenTelemetry's aiohttp instrumentation: that one keeps its tracer, meters and
    redaction in module state that only its `instrument()` sets up (and which had to be patched
    for our allow-lists), and spent ~150 us of CPU per request, twice a metric of its own included."""
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("renderflow.gateway.http")

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.scheme": request.scheme,
            "url.path": request.path,
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        if route:
            attributes["http.route"] = route
        if request.query_string:
            attributes["url.query"] = redact_query(f"?{request.query_string}")[1:]
        if agent := request.headers.get("User-Agent"):
            attributes["user_agent.original"] = agent
        attributes.update(_allowed_request_headers(request))
        status = 500
        with tracer.start_as_current_span(
            f"{request.method} {route}" if route else request.method,
            context=_PROPAGATOR.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = CLIENT_CLOSED  # the client left: no fault of ours
                raise
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    return trace_request


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


def _allowed_request_headers(request: web.Request) -> dict[str, list[str]]:
    wanted = _captured_headers()
    return {
        f"http.request.header.{name.lower().replace('-', '_')}": request.headers.getall(name)
        for name in wanted
        if name.lower() in HEADERS_ALLOWED and name in request.headers
    }


@functools.cache
def _captured_headers() -> list[str]:
    return get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST)


def current_traceparent() -> str | None:
    """The `traceparent` of the current span, or None outside a valid trace."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits), or None outside a valid trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
