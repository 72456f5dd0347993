"""Attributes Renderflow puts on spans beyond the semantic conventions, for the trace report."""

from __future__ import annotations

from opentelemetry import trace

STREAM_ATTRIBUTE = "renderflow.stream"
"""True on the span of a request or call answered with a stream (Server-Sent Events, a WebSocket, a
server-streaming RPC): its duration is how long someone listened, not how long anyone waited."""


def mark_stream() -> None:
    """Marks the current span as the span of a stream."""
    trace.get_current_span().set_attribute(STREAM_ATTRIBUTE, True)
