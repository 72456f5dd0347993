"""Structured JSON logs: one line an event, with the current trace and span ids."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else was passed in `extra=` and is logged as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object with time, level, logger, message, trace ids, extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = format(context.trace_id, "032x")
            entry["span_id"] = format(context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    """Sends every log record of the process to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access logs and library chatter at INFO would drown the events that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_slow_operation(
    logger: logging.Logger,
    phase: str,
    duration_ms: float,
    budget_ms: float,
    timings: Mapping[str, float],
    **fields: Any,
) -> None:
    """One `slow operation` warning: the phase over its budget, and the whole timing breakdown so far
    (`timings`, e.g. `{"auth_ms": 0.2, "db_ms": 250.1}`) so that the line alone says where the time
    went; `fields` name what was slow (render_id, ...). The trace id comes with the current span."""
    logger.warning(
        "slow operation",
        extra={
            "phase": phase,
            "duration_ms": round(duration_ms, 3),
            "budget_ms": budget_ms,
            "timings": {name: round(ms, 3) for name, ms in timings.items()},
            **{key: value for key, value in fields.items() if value is not None},
        },
    )
