"""The metric instruments of the generation service and its workers (exporters are wired elsewhere),
and the loop that keeps the queue gauges current."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import _Gauge as Gauge  # the synchronous gauge, not yet public by name

from services.generation.domain import Ended
from shared.contract import KINDS
from shared.metrics import SCOPE, phase_histogram

log = logging.getLogger(__name__)

QueueDepth = Callable[[], Awaitable[Mapping[tuple[str, str], tuple[int, float]]]]
"""Jobs by (kind, state): how many, and the oldest one's age in seconds."""
"""Jobs by (kind, state), state being `queued` or `running`."""


@dataclass(frozen=True)
class Instruments:
    """Metrics of renders and the queue; built from the global meter provider unless given another.

    The queue gauges count the whole queue, so every generation replica reports the same figures:
    aggregate them with `max`, not `sum`.
    """

    phase_duration: metrics.Histogram
    retries: metrics.Counter
    queued: Gauge
    running: Gauge
    oldest: Gauge

    @classmethod
    def create(cls, meter_provider: metrics.MeterProvider | None = None) -> Instruments:
        meter = metrics.get_meter(f"{SCOPE}.generation", meter_provider=meter_provider)
        return cls(
            phase_duration=phase_histogram(meter),
            retries=meter.create_counter(
                "renderflow.renders.retries",
                unit="{attempt}",
                description="Failed attempts put back in the queue for another, by error code and reason",
            ),
            queued=meter.create_gauge(
                "renderflow.queue.depth",
                unit="{render}",
                description="Renders waiting for a worker (retries in backoff included), by kind",
            ),
            running=meter.create_gauge(
                "renderflow.renders.running", unit="{render}", description="Renders being worked on, by kind"
            ),
            oldest=meter.create_gauge(
                "renderflow.queue.oldest_age",
                unit="s",
                description="How long the oldest render waiting for a worker has been queued, by kind "
                "(0: none waits); workers that are gone or too few show here first",
            ),
        )


_finished = metrics.get_meter(f"{SCOPE}.generation").create_counter(
    "renderflow.renders.finished",
    unit="{render}",
    description="Renders that reached an end, by status, error code and reason, and kind",
)


def count_finished(ended: Ended) -> None:
    """Counts a render that has just ended; a failure by its error code and reason. The store
    reports every end to this (see `store.Store`), inside a transaction that may still roll
    back: a rare over-count, where counting after each commit would spread this everywhere."""
    labels = {"status": ended.status, "render.kind": ended.kind}
    error = ended.error
    if error is not None and ended.status == "failed":
        labels |= {"error.code": error.code, "error.reason": error.reason}
    _finished.add(1, labels)


async def watch_queue(depth: QueueDepth, instruments: Instruments, interval_s: float) -> None:
    """Refreshes the queue gauges from `depth` every `interval_s` seconds, for ever."""
    while True:
        try:
            with suppress_instrumentation():  # a poll is not worth a trace
                jobs = await depth()
        except Exception:
            log.warning("cannot read the queue depth", exc_info=True)
        else:
            # Every kind is reported, 0 when none is there.
            for kind in {*KINDS, *(kind for kind, _ in jobs)}:
                attributes = {"render.kind": kind}
                queued, oldest = jobs.get((kind, "queued"), (0, 0.0))
                instruments.queued.set(queued, attributes)
                instruments.running.set(jobs.get((kind, "running"), (0, 0.0))[0], attributes)
                instruments.oldest.set(round(oldest, 3), attributes)
        await asyncio.sleep(interval_s)
