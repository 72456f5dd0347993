"""The stalled-renders gauge: renders running without progress for longer than the stall threshold.

Stalls are counted apart from failures: a stalled render is still running (its worker renews the
lease) but reports nothing. GetRender flags each one (`stalled`); this gauge counts them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation

from shared.metrics import SCOPE

log = logging.getLogger(__name__)


class Gauge(Protocol):
    """A synchronous gauge (the API's type of it is private in this version)."""

    def set(self, amount: int | float) -> None: ...


def stalled_gauge(meter_provider: metrics.MeterProvider | None = None) -> Gauge:
    """The gauge `renderflow.renders.stalled`."""
    meter = metrics.get_meter(f"{SCOPE}.generation", meter_provider=meter_provider)
    return meter.create_gauge(
        "renderflow.renders.stalled",
        unit="{render}",
        description="Renders running without progress for longer than RENDERFLOW_GENERATION_STALL_AFTER_S",
    )


async def watch_stalls(count: Callable[[], Awaitable[int]], gauge: Gauge, interval_s: float) -> None:
    """Sets the gauge from `count()` every `interval_s` seconds, for ever."""
    while True:
        try:
            with suppress_instrumentation():  # a poll is not worth a trace
                stalled = await count()
        except Exception:
            log.warning("cannot count stalled renders", exc_info=True)
        else:
            gauge.set(stalled)
        await asyncio.sleep(interval_s)
