"""What a render is made with — the user's project, chain and active rules — as the metadata
service says, cached here and kept current by its change feed, so that a submit costs no call to
metadata while the cache is warm.

Consistency: every change to a user's projects, chains or rules that the feed reports drops what
is cached for that user (by moving the user to a new cache generation: entries of the old one are
never read again, and expire). A caller that has just been told a change succeeded passes that
change's seq (`min_seq`); until the feed has reported it here, that caller's reads go to metadata,
so a change acknowledged to a client applies to every render it submits afterwards. Everyone else
sees a change within the feed's lag. While metadata cannot be asked, cached answers keep serving
(nothing can change meanwhile), past their time to live by up to STALE_IF_ERROR_S, as the gateway's
API keys do; a miss is then `Unavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiocache import SimpleMemoryCache
from renderflow.v1 import metadata_pb2, metadata_pb2_grpc

from services.generation.domain import Rule
from shared.change_feed import follow_for_ever
from shared.errors import Unavailable
from shared.rpc_errors import rpc_errors

_NAMESPACE = "catalog:"
_CATALOG_ENTITIES = frozenset({"project", "chain", "rule", "user"})
STALE_IF_ERROR_S = 600.0
"""How long past its time to live a cached placement still serves while metadata cannot be asked."""


@dataclass(frozen=True)
class Placement:
    """Where a render goes: its project (id and slug), its chain and the rules active there."""

    project_id: str
    project: str
    chain_id: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class _Cached:
    placement: Placement
    fresh_until: float
    """When (by the catalog's clock) the placement should be asked for again."""


class Catalog:
    """Projects, chains and active rules per user, read through to metadata on a miss."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        timeout_s: float,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = metadata_pb2_grpc.MetadataServiceStub(channel)
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._clock = clock
        # timeout=None: a memory cache never waits, and aiocache's default (5 s) would run every
        # lookup through asyncio.wait_for, a task of its own each time.
        self._cache = SimpleMemoryCache(namespace=_NAMESPACE, timeout=None)
        self._generations: dict[str, int] = {}
        self.following = asyncio.Event()
        """Set while the change feed is followed (answers are cached only then)."""
        self.applied_seq = 0
        """The last change of the feed applied here: every change up to it is reflected."""

    async def place(self, user_id: str, project: str, chain_id: str, min_seq: int = 0) -> Placement:
        """The user's project (slug or id) and chain (the project's default when empty), with its
        active rules; NotFound for an unknown project or chain, Unavailable when metadata cannot
        be asked and nothing is cached."""
        key = f"{user_id}:{self._generations.get(user_id, 0)}:{project}:{chain_id}"
        cached = await self._cache.get(key) if self.applied_seq >= min_seq else None
        if isinstance(cached, _Cached) and self._clock() < cached.fresh_until:
            return cached.placement
        request = metadata_pb2.ResolveRenderRequest(user_id=user_id, project=project, chain_id=chain_id)
        try:
            with rpc_errors():
                answer = await self._stub.ResolveRender(request, timeout=self._timeout_s)
        except Unavailable:  # a deadline too
            # Nothing can change while metadata is down (changes go through it, and the feed drops
            # what they touch), so a recent answer is still the answer.
            if isinstance(cached, _Cached) and self._clock() < cached.fresh_until + STALE_IF_ERROR_S:
                return cached.placement
            raise
        placement = Placement(
            project_id=answer.project.id,
            project=answer.project.slug,
            chain_id=answer.chain.id,
            rules=tuple(Rule(r.id, r.text) for r in answer.rules),
        )
        # Only while the feed is followed: a change it would have reported may be missed otherwise.
        # A change reported while this read was in flight moved the user to a new generation, so
        # that this answer lands under a key nobody reads.
        if self.following.is_set() and self._ttl_s > 0:
            fresh = _Cached(placement, self._clock() + self._ttl_s)
            await self._cache.set(key, fresh, ttl=self._ttl_s + STALE_IF_ERROR_S)
        return placement

    def forget(self, user_id: str) -> None:
        """Drops everything cached for the user."""
        self._generations[user_id] = self._generations.get(user_id, 0) + 1

    async def follow_changes(self, min_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        """Follows the change feed for ever from its retained history (which tells where it
        stands), forgetting users whose catalog changed; reconnects with capped, jittered backoff
        and resumes after the last change seen, so that nothing is missed."""
        await follow_for_ever(
            self._follow,
            lambda: self.applied_seq,
            min_backoff_s=min_backoff_s,
            max_backoff_s=max_backoff_s,
        )

    async def _follow(self, progressed: Callable[[], None]) -> None:
        call = self._stub.WatchChanges(metadata_pb2.WatchChangesRequest(after_seq=self.applied_seq))
        try:
            with rpc_errors():
                await call.initial_metadata()  # subscribed: from here nothing is missed
                self.following.set()
                async for change in call:
                    progressed()
                    if change.entity in _CATALOG_ENTITIES and change.user_id:
                        self.forget(change.user_id)
                    self.applied_seq = max(self.applied_seq, change.seq)
        finally:
            self.following.clear()
            call.cancel()

    async def close(self) -> None:
        """Empties the cache and cancels its expiry timers."""
        # Only a clear by namespace cancels the timers; a plain clear leaves them pending.
        await self._cache.clear(namespace=_NAMESPACE)
        await self._cache.close()
