"""The event loop's lag: a loop held by blocking work shows it."""

from __future__ import annotations

import asyncio
import time

from shared.resource_metrics import measure_event_loop_lag


async def test_a_blocked_loop_shows_as_lag() -> None:
    lags: list[float] = []
    measuring = asyncio.create_task(measure_event_loop_lag(0.01, lags.append))
    await asyncio.sleep(0.05)  # a few idle rounds
    time.sleep(0.2)  # noqa: ASYNC251 (the point: work that blocks the loop)
    await asyncio.sleep(0.05)
    measuring.cancel()
    assert lags and max(lags) >= 0.15
    assert sorted(lags)[len(lags) // 2] < 0.05  # idle rounds wake on time
