"""Per-request phase timings: one span per phase, a warning over budget, a `Server-Timing` header."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import metrics, trace
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from shared.contract import Timed
from shared.logs import log_slow_operation
from shared.metrics import SCOPE, phase_histogram
from shared.telemetry import Budgets, record_failure

log = logging.getLogger(__name__)
_PHASE_DURATION = phase_histogram(metrics.get_meter(f"{SCOPE}.gateway"))


class PhaseTimer:
    """The phases one request went through (auth, validation, db, enqueue) and their durations."""

    def __init__(self, tracer: Tracer, budgets: Budgets) -> None:
        self._tracer = tracer
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
        """Times the block as phase `name`, inside a span of that name."""
        start = time.perf_counter()
        with self._tracer.start_as_current_span(
            name,
            attributes={"renderflow.phase": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                record_failure(span, exc)
                raise
            finally:
                elapsed_ms = (time.perf_counter() - start) * 1000
                self.phases[name] = self.phases.get(name, 0.0) + elapsed_ms
                span.set_attribute("renderflow.duration_ms", elapsed_ms)
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
