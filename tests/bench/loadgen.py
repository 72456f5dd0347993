"""A closed-loop HTTP load generator for the benchmarks: `clients` loops, each sending its next
request as soon as the previous one is answered, for a fixed time after a short warm-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.bench.figures import latency_summary

Request = Callable[[aiohttp.ClientSession, int], Awaitable[int]]
"""Sends request number n on the session; returns the HTTP status."""


@dataclass
class LoadResult:
    """What one load run saw."""

    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, Any]:
        summary = latency_summary(self.latencies_ms)
        return {
            "clients": self.clients,
            "rps": round(self.rps, 1),
            "errors": self.errors,
            **{k: v for k, v in summary.items() if k != "samples_ms"},
        }


async def closed_loop(
    base_url: str,
    request: Request,
    clients: int,
    seconds: float,
    warmup_s: float = 0.5,
    headers: dict[str, str] | None = None,
    ok: tuple[int, ...] = (200, 201, 202),
) -> LoadResult:
    """Runs `clients` loops against `base_url` for `warmup_s` (not counted) then `seconds`."""
    result = LoadResult(clients, seconds)
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout, headers=headers) as http:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

        async def client() -> None:
            while (now := time.perf_counter()) < stop_at:
                try:
                    status = await request(http, next(counter))
                except (aiohttp.ClientError, OSError, TimeoutError):
                    status = 0
                done = time.perf_counter()
                if now >= measure_from:
                    if status in ok:
                        result.latencies_ms.append((done - now) * 1000)
                    else:
                        result.errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return result
