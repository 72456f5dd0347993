"""How submits read `Prefer` and `Idempotency-Key`, which ids a key stands for and when it expires,
and how references and chain positions become a RenderSpec."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from renderflow.v1 import generation_pb2

from gateway.idempotency import (
    KeyedLocks,
    derived_id,
    expired,
    idempotency_key,
    item_id,
    next_id,
    request_hash,
)
from gateway.submission import prefer_wait, reference
from shared.errors import ValidationFailed


def _request(*headers: tuple[str, str]) -> web.Request:
    return make_mocked_request("POST", "/v1/renders", headers=CIMultiDict(headers))


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ([], None),
        ([("Prefer", "wait=10")], 10.0),
        ([("Prefer", "respond-async, WAIT=3")], 3.0),
        ([("Prefer", "handling=lenient"), ("Prefer", 'wait="7"')], 7.0),
        ([("Prefer", "wait=600")], 60.0),  # clamped to the longest wait
        ([("Prefer", "wait=0")], 0.0),
        ([("Prefer", "wait=soon")], None),  # malformed preferences are ignored, not refused
        ([("Prefer", "wait=-1")], None),
        ([("Prefer", "wait=1.5")], None),
    ],
)
def test_prefer_wait(headers: list[tuple[str, str]], wait: float | None) -> None:
    assert prefer_wait(_request(*headers), 60.0) == wait


def test_idempotency_keys_and_the_ids_they_stand_for() -> None:
    assert idempotency_key(_request()) == ""
    assert idempotency_key(_request(("Idempotency-Key", "order-7"))) == "order-7"
    for bad in ("", "has space", "x" * 256, "é"):
        with pytest.raises(ValidationFailed):
            idempotency_key(_request(("Idempotency-Key", bad)))
    body = request_hash({"b": 1, "a": [1, 2]})
    assert body == request_hash({"a": [1, 2], "b": 1}) != request_hash({"a": [2, 1], "b": 1})
    first = derived_id("u1", "k", body)
    assert first == derived_id("u1", "k", body) != derived_id("u2", "k", body)
    assert first != derived_id("u1", "k", request_hash({}))
    assert next_id(first) == next_id(first) not in {first, next_id(next_id(first))}
    assert len({item_id(first, i) for i in range(64)}) == 64


def test_a_key_expires_after_24_hours() -> None:
    render = generation_pb2.Render(id="r")
    now = datetime(2025, 1, 2, 12, tzinfo=UTC)
    render.created_at.FromDatetime(now - timedelta(hours=23, minutes=59))
    assert not expired(render, now)
    render.created_at.FromDatetime(now - timedelta(hours=24))
    assert expired(render, now)


def test_references_of_a_request() -> None:
    assert reference(None, 3) is None
    assert reference({"url": "https://x/a.png", "required": True}, 3) == generation_pb2.Reference(
        url="https://x/a.png", required=True
    )
    assert reference({"render_id": "r0"}, 1) == generation_pb2.Reference(render_id="r0")
    assert reference({"previous": True}, 2) == generation_pb2.Reference(chain_previous=True)
    assert reference({"previous": True}, 1) is None  # the first of a chain has no predecessor


async def test_keyed_locks_serialize_one_key_and_forget_it_after() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def hold(key: str, name: str, pause: float) -> None:
        async with locks.hold(key):
            order.append(f"{name} in")
            await asyncio.sleep(pause)
            order.append(f"{name} out")

    await asyncio.gather(hold("k", "a", 0.02), hold("k", "b", 0), hold("other", "c", 0))
    assert order.index("a out") < order.index("b in")  # the same key waits
    assert order.index("c in") < order.index("a out")  # another key does not
    assert len(locks) == 0
