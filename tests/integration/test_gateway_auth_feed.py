"""The gateway's API-key cache follows the metadata change feed: from now on at first (no replay of
history for an empty cache), resumed after the last change seen on reconnection, caught up from the
retained history when keys are cached but no change was seen yet; revocations drop keys at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from renderflow.v1 import metadata_pb2

from gateway.auth import FROM_NOW, Authenticator
from gateway.clients import MetadataClient
from services.metadata import admin
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.errors import Unauthenticated, Unavailable
from shared.grpc_client import create_channel
from tests.conftest import free_port
from tests.support import eventually as eventually_true
from tests.support.gateway_stack import eventually


class RecordingMetadata(MetadataClient):
    """A metadata client that remembers where each watch began and what it delivered."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.watched_after: list[int] = []
        self.started = 0
        self.delivered: list[int] = []

    def watch_changes(
        self, after_seq: int, on_start: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[metadata_pb2.Change, None]:
        self.watched_after.append(after_seq)

        async def started() -> None:
            self.started += 1
            if on_start is not None:
                await on_start()

        return self._record(super().watch_changes(after_seq, started))

    async def _record(
        self, changes: AsyncGenerator[metadata_pb2.Change, None]
    ) -> AsyncGenerator[metadata_pb2.Change, None]:
        async with contextlib.aclosing(changes):
            async for change in changes:
                self.delivered.append(change.seq)
                yield change


def _settings(database_url: str) -> MetadataSettings:
    # A fixed port: the server restarts where the gateway's channel expects it.
    return MetadataSettings(
        listen=f"127.0.0.1:{free_port()}", database_url=database_url, change_poll_s=0.2, drain_grace_s=0.5
    )


@contextlib.asynccontextmanager
async def _following(auth: Authenticator) -> AsyncIterator[None]:
    follower = asyncio.create_task(auth.follow_changes(min_backoff_s=0.01, max_backoff_s=0.2))
    try:
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await auth.close()


async def _revoked(auth: Authenticator, key: str) -> bool:
    try:
        await auth.authenticate(f"Bearer {key}")
    except Unauthenticated:
        return True
    except Unavailable:
        return False
    return False


async def test_the_feed_starts_from_now_and_resumes_after_the_last_change(database_url: str) -> None:
    settings = _settings(database_url)
    _, old_key = await admin.create_user(database_url, "alice")  # history: seq 1 and 2
    async with create_channel(settings.listen) as channel:
        metadata = RecordingMetadata(channel, 5.0)
        auth = Authenticator(metadata, ttl_s=60.0)
        async with _following(auth):
            async with metadata_running(settings):
                await eventually_true(lambda: metadata.started == 1)
                assert metadata.watched_after == [FROM_NOW]  # nothing cached: history is of no use
                assert (await auth.authenticate(f"Bearer {old_key}")).user_name == "alice"  # cached
                # The watch subscribes at some moment: create users until a change comes through.
                names = iter(f"user{i}" for i in range(1000))

                async def seen() -> bool:
                    await admin.create_user(database_url, next(names))
                    return bool(metadata.delivered)

                await eventually(seen, 5.0)
                assert min(metadata.delivered) > 2  # history was not replayed

                [info] = await admin.list_keys(database_url, "alice")
                await admin.revoke_key(database_url, str(info["id"]))
                await eventually(lambda: _revoked(auth, old_key), 5.0)
                last = auth.last_seq
            async with metadata_running(settings):
                await eventually_true(lambda: len(metadata.watched_after) >= 2)
                assert set(metadata.watched_after[1:]) == {last}  # resumed where it left off


async def test_without_a_change_seen_a_cache_is_caught_up_from_history(database_url: str) -> None:
    settings = _settings(database_url)
    _, key = await admin.create_user(database_url, "bob")
    [info] = await admin.list_keys(database_url, "bob")
    async with create_channel(settings.listen) as channel:
        metadata = RecordingMetadata(channel, 5.0)
        auth = Authenticator(metadata, ttl_s=60.0)
        async with _following(auth):
            async with metadata_running(settings):
                await eventually_true(lambda: metadata.started == 1)  # watching from now on
                await auth.authenticate(f"Bearer {key}")
            # Metadata is down: the cache still answers, and a revocation goes unheard.
            assert (await auth.authenticate(f"Bearer {key}")).user_name == "bob"
            await admin.revoke_key(database_url, str(info["id"]))
            async with metadata_running(settings):
                # No seq to resume from, and a key cached: the feed replays what it retains.
                await eventually(lambda: _revoked(auth, key), 5.0)
    assert metadata.watched_after[0] == FROM_NOW
    assert metadata.watched_after[-1] == 0


async def test_keys_cached_before_the_first_watch_are_caught_up_from_history(database_url: str) -> None:
    settings = _settings(database_url)
    _, key = await admin.create_user(database_url, "carol")
    [info] = await admin.list_keys(database_url, "carol")
    async with create_channel(settings.listen) as channel:
        metadata = RecordingMetadata(channel, 5.0)
        auth = Authenticator(metadata, ttl_s=60.0)
        async with metadata_running(settings):
            await auth.authenticate(f"Bearer {key}")  # cached before any watch
        await admin.revoke_key(database_url, str(info["id"]))  # and revoked, unheard
        async with _following(auth), metadata_running(settings):
            await eventually(lambda: _revoked(auth, key), 5.0)
        assert metadata.watched_after[0] == 0
