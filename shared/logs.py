"""Structured JSON logs: one line an event, with the current trace and span ids; and log files
rotated by size."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
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


SLOW_LOGS_PER_S = 5.0
"""`slow operation` warnings a process writes per phase per second at most (bursts of as many)."""


class LogThrottle:
    """A token bucket per key: whether to write one more line, and how many were dropped since the
    last one written. Under overload every request is slow; a line for each would flood the logs and
    spend on formatting the CPU that the requests lack (the phase histogram still counts them all)."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_s = per_s
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, int]] = {}
        """key: (tokens, when they were counted, lines dropped since the last one written)."""

    def admit(self, key: str) -> int | None:
        """None to drop this line; else how many lines of `key` were dropped before it."""
        now = self._clock()
        tokens, then, dropped = self._buckets.get(key, (self._per_s, now, 0))
        tokens = min(self._per_s, tokens + (now - then) * self._per_s)
        if tokens < 1:
            self._buckets[key] = (tokens, now, dropped + 1)
            return None
        self._buckets[key] = (tokens - 1, now, 0)
        return dropped


_slow_logs = LogThrottle(SLOW_LOGS_PER_S)


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
    went; `fields` name what was slow (render_id, ...). The trace id comes with the current span.

    At most SLOW_LOGS_PER_S lines per phase per second are written; a line written after some were
    dropped says how many (`suppressed`)."""
    dropped = _slow_logs.admit(f"{logger.name}:{phase}")
    if dropped is None:
        return
    extra: dict[str, Any] = {
        "phase": phase,
        "duration_ms": round(duration_ms, 3),
        "budget_ms": budget_ms,
        "timings": {name: round(ms, 3) for name, ms in timings.items()},
        **{key: value for key, value in fields.items() if value is not None},
    }
    if dropped:
        extra["suppressed"] = dropped
    logger.warning("slow operation", extra=extra)


class RotatingFile:
    """Bytes appended to `path`, which becomes `path.1` (`path.1` becoming `path.2`, and so on up to
    `path.<backups>`, the oldest dropped) before a write would take it past `max_bytes`: the scheme of
    logging's RotatingFileHandler, for raw output. Lines are never split between files (a line longer
    than `max_bytes` gets a file of its own); `max_bytes` 0 never rotates.

    With `shared`, several processes may append to the same path: each write, and so each rotation,
    happens under an flock of `.<name>.lock` beside it, and a writer whose file was rotated (or moved
    away) by someone else reopens the path before it writes, so no line lands in a renamed file.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, *, shared: bool = False) -> None:
        if max_bytes and backups < 1:
            raise ValueError(f"rotating {path} needs at least one backup, got {backups}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()  # an flock does not exclude threads sharing its descriptor
        self._flock_fd: int | None = None
        if shared:
            lock_path = path.with_name(f".{path.name}.lock")
            self._flock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fd = -1
        self._id = (0, 0)
        self._open()

    def write(self, data: bytes) -> None:
        """Append `data`; what does not fit goes to a new file once the whole lines that do are written."""
        with self._lock, self._locked():
            while data:
                size = self._size()
                if not self._max_bytes or size + len(data) <= self._max_bytes:
                    self._append(data)
                    return
                cut = data.rfind(b"\n", 0, max(0, self._max_bytes - size)) + 1
                if cut == 0 and size == 0:  # a line longer than the limit: a file of its own
                    cut = data.find(b"\n") + 1 or len(data)
                self._append(data[:cut])
                data = data[cut:]
                if data:
                    self._rotate()

    def close(self) -> None:
        """Close the file (and the lock). Idempotent."""
        with self._lock:
            for fd in (self._fd, self._flock_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            self._fd, self._flock_fd = -1, None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._flock_fd is None:
            yield
            return
        fcntl.flock(self._flock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._flock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        status = os.fstat(self._fd)
        self._id = (status.st_dev, status.st_ino)

    def _size(self) -> int:
        """The size of the file at `path`, which is reopened first if it is no longer ours."""
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(self.path)
            if (status.st_dev, status.st_ino) == self._id:
                return status.st_size
        self._open()
        return os.fstat(self._fd).st_size

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _rotate(self) -> None:
        for n in range(self._backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, f"{self.path}.1")
        self._open()
