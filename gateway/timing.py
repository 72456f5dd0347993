"""Per-request phase timings: one span per phase, a warning over budget, a `Server-Timing` header."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Tracer

from gateway.config import Budgets

log = logging.getLogger(__name__)


class PhaseTimer:
    """The phases one request went through (auth, validation, db, enqueue) and their durations."""

    def __init__(self, tracer: Tracer, budgets: Budgets) -> None:
        self._tracer = tracer
        self._budgets = budgets
        self._started = time.perf_counter()
        self.phases: dict[str, float] = {}
        """Milliseconds spent in each phase so far, in the order they began."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as phase `name`, inside a span of that name."""
        start = time.perf_counter()
        with self._tracer.start_as_current_span(name, attributes={"renderflow.phase": name}) as span:
            try:
                yield
            finally:
                elapsed_ms = (time.perf_counter() - start) * 1000
                self.phases[name] = self.phases.get(name, 0.0) + elapsed_ms
                span.set_attribute("renderflow.duration_ms", elapsed_ms)
                budget = self._budgets.of(name)
                if budget is not None and elapsed_ms > budget:
                    log.warning(
                        "slow phase",
                        extra={"phase": name, "duration_ms": round(elapsed_ms, 2), "budget_ms": budget},
                    )

    def total_ms(self) -> float:
        """Milliseconds since the request reached the gateway."""
        return (time.perf_counter() - self._started) * 1000

    def server_timing(self) -> str:
        """The `Server-Timing` header value: each phase, then `total`."""
        entries = [*self.phases.items(), ("total", self.total_ms())]
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in entries)
