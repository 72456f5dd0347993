"""Safe retries of submits: the `Idempotency-Key` header, request fingerprints, and the ids a key and
body stand for during the key's 24-hour window.

A keyed submit's render id is derived from the user, the key and the body, so a repeat finds its
render with one read before allocating a chain position, and racing repeats that both miss it
still make one render (generation refuses a second row with the same id and answers with the
first). Requests of one key wait for each other in this process, so that racing repeats here
do not even allocate a second position. When the render a key made is older than the window,
the key is free again: the next id in the key's sequence is used, and generation releases the
key from the expired render.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.clients import GenerationClient
from shared.errors import NotFound, ValidationFailed

WINDOW = timedelta(hours=24)
"""How long a key stands for the request it was first used with."""
MAX_REUSES = 32
"""How many expired uses of one key with one body are skipped before a random id is used."""
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_NAMESPACE = uuid.UUID("5f1c0a53-2d55-4c4e-9a51-7d1f3c1e0b6a")


def idempotency_key(request: web.Request) -> str:
    """The `Idempotency-Key` header (1..255 visible ASCII characters), or "" without one."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ""
    if not _KEY.fullmatch(key):
        raise ValidationFailed.field("Idempotency-Key", "must be 1 to 255 visible ASCII characters")
    return key


def request_hash(document: Any) -> str:
    """SHA-256 of the canonical JSON of a request: equal for equal requests."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derived_id(user_id: str, key: str, body_hash: str) -> str:
    """The id a key and body stand for when the key is first used."""
    return str(uuid.uuid5(_NAMESPACE, f"{user_id}\n{key}\n{body_hash}"))


def next_id(previous: str) -> str:
    """The id the same key and body stand for once `previous` has expired."""
    return str(uuid.uuid5(_NAMESPACE, previous))


def item_id(base: str, index: int) -> str:
    """The id of a batch's item `index`, from the batch's base id."""
    return str(uuid.uuid5(_NAMESPACE, f"{base}\n{index}"))


def expired(render: generation_pb2.Render, now: datetime | None = None) -> bool:
    """Whether the render was made longer ago than the window, so its key is free again."""
    made = render.created_at.ToDatetime(tzinfo=UTC)
    return (now or datetime.now(UTC)) - made >= WINDOW


async def find_repeat(
    generation: GenerationClient,
    user_id: str,
    key: str,
    body_hash: str,
    probe: Callable[[str], str] = lambda base: base,
) -> tuple[str, generation_pb2.Render | None]:
    """The base id of a keyed request and, when it repeats one made within the window, the render
    that request made (found at `probe(base)`: the render itself, or a batch's first item)."""
    base = derived_id(user_id, key, body_hash)
    for _ in range(MAX_REUSES):
        try:
            found = await generation.get_render(user_id, probe(base))
        except NotFound:
            return base, None
        if not expired(found):
            return base, found
        base = next_id(base)
    return str(uuid.uuid4()), None


class KeyedLocks:
    """One asyncio lock per key, existing only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Runs the block while no other holder of `key` in this process runs its own."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


SUBMIT_LOCKS = web.AppKey("submit_locks", KeyedLocks)


@asynccontextmanager
async def one_at_a_time(request: web.Request, user_id: str, key: str) -> AsyncIterator[None]:
    """Runs the block while no other request of this user with this key runs its own here, so
    that of racing repeats the later finds the render the earlier made (no-op without a key)."""
    if not key:
        yield
        return
    async with request.app[SUBMIT_LOCKS].hold((user_id, key)):
        yield


async def idempotency_context(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: the application's per-key submit locks."""
    app[SUBMIT_LOCKS] = KeyedLocks()
    yield
