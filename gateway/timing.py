"""Per-request phase timings: attributes of the request's span, a warning over budget, a
`Server-Timing` header.

The gateway's phases (auth, validation, enqueue, wait) are timed in its own process and mostly take
well under a millisecond; a span each would cost more than they measure (a span is ~50 us of CPU to
create and ~30 us to export). So each is an attribute `renderflow.phases.<phase>_ms` of the
request's span (`shared.contract.phase_attribute`), which `renderflow trace-report` reads as it reads
phase spans; what a phase calls (an RPC, a cache miss's lookup) has its own span as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.util.types import AttributeValue

from shared.contract import Timed, phase_attribute
from shared.logs import log_slow_operation
from shared.metrics import SCOPE, phase_histogram
from shared.telemetry import Budgets

log = logging.getLogger(__name__)
_PHASE_DURATION = phase_histogram(metrics.get_meter(f"{SCOPE}.gateway"))


class PhaseTimer:
    """The phases one request went through (auth, validation, db, enqueue) and their durations."""

    def __init__(self, budgets: Budgets) -> None:
        self._budgets = budgets
        self._started = time.perf_counter()
        # Created inside the request's server span: attributes found later go on that span.
        self._request_span = trace.get_current_span()
        self._attributes: dict[str, AttributeValue] = {}
        self._slow: list[tuple[str, float, float]] = []
        self.phases: dict[str, float] = {}
        """Milliseconds spent in each phase so far, in the order they began."""

    def annotate(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Attributes of the request a person filters on (`render.id`, `render.project`, ...), put on
        the request's span and on its slow-operation warnings."""
        self._attributes.update(attributes)
        self._request_span.set_attributes(attributes)

    @contextmanager
    def phase(self, name: Timed) -> Iterator[None]:
        """Times the block as phase `name` (its failures are the request's: the request span
        and its status say them)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1000
            spent_ms = self.phases[name] = self.phases.get(name, 0.0) + elapsed_ms
            self._request_span.set_attribute(phase_attribute(name), round(spent_ms, 3))
            labels: dict[str, str] = {"phase": name}
            if kind := self._attributes.get("render.kind"):
                labels["render.kind"] = str(kind)
            _PHASE_DURATION.record(elapsed_ms / 1000, labels)
            budget = self._budgets.of(name)
            if budget is not None and elapsed_ms > budget:
                self._slow.append((name, elapsed_ms, budget))

    def log_slow(self) -> None:
        """At the end of the request: one `slow operation` warning per phase over its budget, each with
        the request's whole timing breakdown."""
        timings = {f"{name}_ms": ms for name, ms in self.phases.items()} | {"total_ms": self.total_ms()}
        render_id = self._attributes.get("render.id")
        for name, elapsed_ms, budget in self._slow:
            log_slow_operation(log, name, elapsed_ms, budget, timings, render_id=render_id)
        self._slow.clear()

    def total_ms(self) -> float:
        """Milliseconds since the request reached the gateway."""
        return (time.perf_counter() - self._started) * 1000

    def server_timing(self) -> str:
        """The `Server-Timing` header value: each phase, then `total`."""
        entries = [*self.phases.items(), ("total", self.total_ms())]
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in entries)
