"""Server spans for incoming requests (continuing the client's `traceparent`) and the W3C context
of the current span for responses."""

from __future__ import annotations

import warnings
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation import aiohttp_server
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

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
    return aiohttp_server.create_aiohttp_middleware(tracer_provider=tracer_provider)


def current_traceparent() -> str | None:
    """The `traceparent` of the current span, or None outside a valid trace."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def current_trace_id() -> str | None:
    """The current trace id (32 hex digits), or None outside a valid trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
