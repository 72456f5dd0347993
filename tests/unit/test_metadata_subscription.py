"""A change-feed subscription: delivers in order, and cuts off a watcher that falls too far behind."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from services.metadata.changefeed import Subscription
from services.metadata.domain import Change
from shared.errors import Unavailable


def _change(seq: int) -> Change:
    return Change(seq, "rule", "created", uuid.uuid4(), uuid.uuid4(), datetime.now(UTC))


async def test_delivers_in_order_and_wakes_a_waiting_watcher() -> None:
    subscription = Subscription(limit=10)
    waiting = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    subscription.push(_change(1))
    subscription.push(_change(2))
    assert (await asyncio.wait_for(waiting, 1)).seq == 1
    assert (await subscription.next()).seq == 2


async def test_a_watcher_that_falls_behind_is_cut_off() -> None:
    subscription = Subscription(limit=3)
    for seq in range(1, 5):
        subscription.push(_change(seq))
    with pytest.raises(Unavailable, match="fell behind"):
        await subscription.next()


async def test_ending_wakes_a_waiting_watcher() -> None:
    subscription = Subscription(limit=3)
    waiting = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    subscription.end("shutting down")
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(waiting, 1)
