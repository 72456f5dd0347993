"""What a process uses, as metrics: its PostgreSQL pools (connections in use and idle, requests
waiting, time to acquire a connection, errors), its event loop's lag, and (from prometheus_client's
default registry, which `shared.metrics` exposes) CPU, memory and file descriptors.

Pool exhaustion shows as `renderflow_db_pool_waiting` above 0 and a rising
`renderflow_db_pool_acquire_duration_seconds`; a loop blocked by CPU work or a blocking call as
`renderflow_event_loop_lag_seconds` (every request on the process waits that long too).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from shared.metrics import DURATION_BUCKETS_S, SCOPE

LAG_INTERVAL_S = 0.5
"""How often the event loop's lag is measured."""
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_meter = metrics.get_meter(f"{SCOPE}.resources")
_pools: weakref.WeakSet[AsyncConnectionPool] = weakref.WeakSet()
_acquire = _meter.create_histogram(
    "renderflow.db.pool.acquire.duration",
    unit="s",
    description="Time to get a connection from a PostgreSQL pool (waiting included), by pool",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S,
)


class MeasuredPool(AsyncConnectionPool):
    """A psycopg pool that times every wait for a connection and reports its state as metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _pools.add(self)

    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:
        started = time.perf_counter()
        try:
            return await super().getconn(timeout)
        finally:
            _acquire.record(time.perf_counter() - started, {"pool": self.name})


def _connections(options: CallbackOptions) -> Iterable[Observation]:
    for pool in list(_pools):
        stats = pool.get_stats()
        size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
        yield Observation(idle, {"pool": pool.name, "state": "idle"})
        yield Observation(max(0, size - idle), {"pool": pool.name, "state": "in_use"})


def _limits(options: CallbackOptions) -> Iterable[Observation]:
    for pool in list(_pools):
        yield Observation(pool.max_size, {"pool": pool.name})


def _waiting(options: CallbackOptions) -> Iterable[Observation]:
    for pool in list(_pools):
        yield Observation(pool.get_stats().get("requests_waiting", 0), {"pool": pool.name})


def _errors(options: CallbackOptions) -> Iterable[Observation]:
    for pool in list(_pools):
        stats = pool.get_stats()
        yield Observation(stats.get("requests_errors", 0), {"pool": pool.name, "kind": "request"})
        yield Observation(stats.get("connections_errors", 0), {"pool": pool.name, "kind": "connect"})
        yield Observation(stats.get("connections_lost", 0), {"pool": pool.name, "kind": "lost"})


_meter.create_observable_gauge(
    "renderflow.db.pool.connections",
    [_connections],
    unit="{connection}",
    description="Connections of a PostgreSQL pool, by pool and state (in_use, idle)",
)
_meter.create_observable_gauge(
    "renderflow.db.pool.max", [_limits], unit="{connection}", description="A pool's most connections"
)
_meter.create_observable_gauge(
    "renderflow.db.pool.waiting",
    [_waiting],
    unit="{request}",
    description="Requests waiting for a connection of a pool (the pool is exhausted while above 0)",
)
_meter.create_observable_counter(
    "renderflow.db.pool.errors",
    [_errors],
    unit="{error}",
    description="A pool's failures: requests that timed out waiting (request), connections that "
    "could not be made (connect) or were found broken (lost)",
)
_lag = _meter.create_histogram(
    "renderflow.event_loop.lag",
    unit="s",
    description="How late the event loop woke a task that slept (everything on it waited as long)",
    explicit_bucket_boundaries_advisory=LAG_BUCKETS_S,
)


async def measure_event_loop_lag(
    interval_s: float = LAG_INTERVAL_S, record: Callable[[float], None] = _lag.record
) -> None:
    """Records (by default as `renderflow.event_loop.lag`), for ever, how much later than asked a
    sleep of `interval_s` ends."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        record(max(0.0, loop.time() - started - interval_s))
