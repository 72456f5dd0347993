"""Per-backend rate limits shared by every worker: calls to a backend start at most `rate` per
second, whichever worker makes them.

Each backend has one row in PostgreSQL holding the earliest moment its next call may start. A
worker about to call the backend reserves the next free moment in one atomic statement (the row
lock orders concurrent reservations) and sleeps until it: first come, first served, with no
retry loop and no burst above the rate. The limit is applied just before the backend call, not in
the claim: a claim only decides which jobs a worker holds (concurrency); a job waiting for its
turn holds its worker slot for at most (slots waiting ahead of it) / rate seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from opentelemetry.instrumentation.utils import suppress_instrumentation

from services.generation.protocols import WorkerStore
from shared.settings import ConfigError


def parse_rates(items: list[str], variable: str) -> dict[str, float]:
    """`["procedural=0", "http=5"]` as {backend: calls per second}; 0 means unlimited."""
    rates: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not sep or not name.strip() or rate < 0:
            raise ConfigError(f"{variable} must look like `procedural=0,http=5`, got {item!r}")
        rates[name.strip()] = rate
    return rates


class BackendPacing:
    """Spaces the calls to each rate-limited backend across all workers."""

    def __init__(self, store: WorkerStore, rates: Mapping[str, float]) -> None:
        self._store = store
        self._intervals = {name: 1.0 / rate for name, rate in rates.items() if rate > 0}

    async def wait_turn(self, backend: str) -> float:
        """Waits until this call to `backend` may start; returns the seconds waited."""
        interval = self._intervals.get(backend)
        if interval is None:
            return 0.0
        with suppress_instrumentation():
            delay = await self._store.reserve_turn(backend, interval)
        if delay > 0:
            await asyncio.sleep(delay)
        return delay
