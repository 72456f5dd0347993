"""API-key authentication: `Authorization: Bearer <key>` resolved by the metadata service, cached
briefly, with cached entries dropped as soon as the change feed reports a key revoked."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiocache import SimpleMemoryCache
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.clients import MetadataClient
from gateway.state import TIMER
from shared.change_feed import follow_for_ever
from shared.errors import Unauthenticated, Unavailable

MAX_KEY_LENGTH = 512
# Paths under this prefix (and the API's root, /v1) need a key; health, readiness and the spec do not.
PROTECTED_PREFIX = "/v1/"
API_ROOT = "/v1"
_NAMESPACE = "auth:"
# Entries of the revocation index are pruned once it holds this many.
_INDEX_PRUNE_AT = 10_000
STALE_IF_ERROR_S = 600.0
"""How long past its cache entry a key is still taken while metadata cannot be asked."""
FROM_NOW = -1
"""The change feed's `after_seq` that replays nothing: history is of no use to a new cache."""


class _CatchUp(Exception):
    """A watch from now on would miss what the cache needs: watch from the retained history."""


@dataclass(frozen=True)
class Principal:
    """The caller, as its API key says."""

    user_id: str
    user_name: str
    key_id: str


@dataclass(frozen=True)
class _Indexed:
    principal: Principal
    expires_at: float


def bearer_key(authorization: str | None) -> str:
    """The API key of an `Authorization: Bearer <key>` header; Unauthenticated when absent or malformed."""
    if not authorization:
        raise Unauthenticated("An API key is required: send `Authorization: Bearer <key>`.")
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > MAX_KEY_LENGTH or " " in key:
        raise Unauthenticated("The Authorization header must be `Bearer <key>`.")
    return key


def _cache_key(api_key: str) -> str:
    # The cache never holds a key itself, only its digest.
    return hashlib.sha256(api_key.encode()).hexdigest()


class Authenticator:
    """Resolves API keys to principals through a short-lived cache in front of metadata."""

    def __init__(self, metadata: MetadataClient, ttl_s: float) -> None:
        self._metadata = metadata
        self._ttl_s = ttl_s
        # timeout=None: a memory cache never waits, and aiocache's default (5 s) would run every
        # lookup through asyncio.wait_for, a task of its own each time.
        self._cache = SimpleMemoryCache(namespace=_NAMESPACE, timeout=None)
        self._index: dict[str, _Indexed] = {}
        self._invalidations = 0
        self._revocation_listeners: list[Callable[[str | None, str | None], object]] = []
        self.last_seq = FROM_NOW
        """The last change of the metadata feed seen (FROM_NOW before the first); the feed resumes
        after it."""

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header's key; Unauthenticated when it is not valid."""
        api_key = bearer_key(authorization)
        digest = _cache_key(api_key)
        cached = await self._cache.get(digest)
        if isinstance(cached, Principal):
            return cached
        invalidations = self._invalidations
        try:
            answer = await self._metadata.authenticate(api_key)
        except Unavailable:
            # Metadata is down, so nothing can have been revoked meanwhile (a revocation goes through
            # it, and its feed drops our entry): a recently valid key stays valid a while longer.
            known = self._index.get(digest)
            if known is not None and time.monotonic() < known.expires_at + STALE_IF_ERROR_S:
                return known.principal
            raise
        principal = Principal(user_id=answer.user.id, user_name=answer.user.name, key_id=answer.key_id)
        # A revocation that arrived while the call was in flight may concern this very key.
        if self._ttl_s > 0 and invalidations == self._invalidations:
            await self._cache.set(digest, principal, ttl=self._ttl_s)
            self._remember(digest, principal)
        return principal

    def _remember(self, digest: str, principal: Principal) -> None:
        now = time.monotonic()
        if len(self._index) >= _INDEX_PRUNE_AT:
            self._index = {d: e for d, e in self._index.items() if e.expires_at + STALE_IF_ERROR_S > now}
        self._index[digest] = _Indexed(principal, now + self._ttl_s)

    def on_revoked(self, listener: Callable[[str | None, str | None], object]) -> None:
        """Calls `listener(key_id, user_id)` whenever the change feed revokes a key (user_id None)
        or deletes a user (key_id None), after its cached answers are dropped."""
        self._revocation_listeners.append(listener)

    async def forget(self, *, key_id: str | None = None, user_id: str | None = None) -> None:
        """Drops the cached answers for an API key, or for every key of a user, and tells the
        revocation listeners."""
        self._invalidations += 1
        doomed = [
            digest
            for digest, entry in self._index.items()
            if entry.principal.key_id == key_id or entry.principal.user_id == user_id
        ]
        for digest in doomed:
            del self._index[digest]
            await self._cache.delete(digest)
        for listener in self._revocation_listeners:
            listener(key_id, user_id)

    async def follow_changes(self, min_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        """Follows the metadata change feed for ever, forgetting revoked keys and deleted users;
        reconnects with capped, jittered backoff and resumes after the last change seen.

        Until a change has been seen there is no seq to resume from. A watch then starts from now
        on while nothing is cached (history concerns no cached answer), else from the oldest
        change retained (a key cached before any watch began may have been revoked since)."""
        await follow_for_ever(
            self._follow,
            lambda: self.last_seq,
            min_backoff_s=min_backoff_s,
            max_backoff_s=max_backoff_s,
            again_at_once=(_CatchUp,),
        )

    async def _follow(self, progressed: Callable[[], None]) -> None:
        after = self.last_seq
        if after == FROM_NOW and self._index:
            after = 0
        started = functools.partial(self._watch_started, after)
        async with contextlib.aclosing(self._metadata.watch_changes(after, started)) as changes:
            async for change in changes:
                progressed()
                self.last_seq = change.seq
                if change.entity == "api_key" and change.action in {"revoked", "deleted"}:
                    await self.forget(key_id=change.entity_id)
                elif change.entity == "user" and change.action == "deleted":
                    await self.forget(user_id=change.entity_id)

    async def _watch_started(self, after_seq: int) -> None:
        if after_seq == FROM_NOW and self._index:
            # Keys were cached while this watch was on its way (a call waits, or is retried, until
            # metadata answers): one may have been revoked before it began. Catch up instead.
            raise _CatchUp()

    async def close(self) -> None:
        """Empties the cache and cancels its expiry timers."""
        # Only a clear by namespace cancels the timers; a plain clear leaves them pending.
        await self._cache.clear(namespace=_NAMESPACE)
        await self._cache.close()


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
PRINCIPAL = web.RequestKey("principal", Principal)


WEBSOCKET_BEARER = "bearer"
"""The WebSocket subprotocol that carries an API key: a browser, which cannot set Authorization on
a WebSocket, offers `Sec-WebSocket-Protocol: bearer, <key>` and the server selects `bearer`."""


def _offered_bearer(request: web.Request) -> tuple[str, str] | None:
    """The subprotocols `bearer, <key>` of a WebSocket handshake, as the client spelt them."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return None
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0].lower() == WEBSOCKET_BEARER and offered[1]:
        return offered[0], offered[1]
    return None


def websocket_authorization(request: web.Request) -> str | None:
    """`Bearer <key>` from a WebSocket handshake offering the subprotocols `bearer, <key>`."""
    offered = _offered_bearer(request)
    return None if offered is None else f"Bearer {offered[1]}"


def websocket_bearer_protocol(request: web.Request) -> str | None:
    """The subprotocol to select for a handshake that authenticated with `bearer, <key>` (in the
    client's spelling of `bearer`); None when it offered no key."""
    offered = _offered_bearer(request)
    return None if offered is None else offered[0]


async def authenticated(request: web.Request) -> Principal:
    """The caller of `request`, authenticated now (the `auth` phase) unless it already was."""
    found = request.get(PRINCIPAL)
    if found is None:
        authorization = request.headers.get("Authorization") or websocket_authorization(request)
        with request[TIMER].phase("auth"):
            found = await request.app[AUTHENTICATOR].authenticate(authorization)
        request[PRINCIPAL] = found
    return found


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticates every request under /v1/ (and to /v1 itself) before its handler runs."""
    if request.path.startswith(PROTECTED_PREFIX) or request.path == API_ROOT:
        await authenticated(request)
    return await handler(request)


def principal(request: web.Request) -> Principal:
    """The authenticated caller of a request under /v1/."""
    return request[PRINCIPAL]
