"""Generation's catalog (a user's projects, chains and rules, cached and kept current by metadata's
change feed) keeps placing renders while metadata is down: what it knew stays true, since every
change goes through metadata, for a while past its time to live; what it never knew is a typed
`Unavailable`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from renderflow.v1.metadata_pb2_grpc import MetadataServiceStub

from services.generation.catalog import STALE_IF_ERROR_S, Catalog
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.errors import Unavailable
from shared.grpc_client import create_channel
from tests.support.gateway_stack import eventually
from tests.support.generation import PROJECT, Accounts

TTL_S = 300.0


class Clock:
    """The catalog's sense of time, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def following(catalog: Catalog) -> AsyncIterator[None]:
    """The catalog following the change feed, once it has subscribed."""
    follower = asyncio.create_task(catalog.follow_changes(max_backoff_s=0.2))
    try:
        async with asyncio.timeout(10):
            await catalog.following.wait()
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def test_cached_placements_outlive_their_ttl_while_metadata_is_down(database_url: str) -> None:
    settings = MetadataSettings(listen="127.0.0.1:0", database_url=database_url, change_poll_s=0.2)
    clock = Clock()
    metadata = metadata_running(settings)
    port = await metadata.__aenter__()
    metadata_up = True
    try:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            accounts = Accounts(MetadataServiceStub(channel))
            alice = await accounts.user("alice")
            bob = await accounts.user("bob")  # never placed: nothing of his is cached
            await accounts.rule("warm light", user=alice)
            catalog = Catalog(channel, timeout_s=1.0, ttl_s=TTL_S, clock=clock)
            async with following(catalog):
                # The feed replays the history so far first; what it reports drops what is cached.
                last_seq = max(accounts.change_seq(alice), accounts.change_seq(bob))

                async def caught_up() -> bool:
                    return catalog.applied_seq >= last_seq

                await eventually(caught_up)
                warm = await catalog.place(alice, PROJECT, "")
                assert [rule.text for rule in warm.rules] == ["warm light"]

                await metadata.__aexit__(None, None, None)
                metadata_up = False
                clock.now += TTL_S + 1  # past its time to live: it would be asked for again
                assert await catalog.place(alice, PROJECT, "") == warm
                with pytest.raises(Unavailable):
                    await catalog.place(bob, PROJECT, "")
                clock.now += STALE_IF_ERROR_S  # and past the grace, too old to vouch for
                with pytest.raises(Unavailable):
                    await catalog.place(alice, PROJECT, "")
            await catalog.close()
    finally:
        if metadata_up:
            await metadata.__aexit__(None, None, None)
