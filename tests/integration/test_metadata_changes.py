"""The metadata change feed: replay after a seq, live changes via NOTIFY, resumption without gaps
or duplicates, a LISTEN connection that heals, and pruning."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from renderflow.v1 import metadata_pb2 as pb
from renderflow.v1.metadata_pb2_grpc import MetadataServiceStub

from services.metadata import admin
from services.metadata.config import Settings
from services.metadata.listener import LISTENER_NAME
from services.metadata.server import running
from services.metadata.store import Store, prepare_schema
from shared.grpc_client import create_channel

if TYPE_CHECKING:
    from renderflow.v1.metadata_pb2_grpc import MetadataServiceAsyncStub

# Long enough that a change arriving within PROMPT_S came by NOTIFY, not by the fallback poll.
POLL_S = 30.0
PROMPT_S = 3.0


class Watch:
    """One WatchChanges stream, pumped into a queue by a background task."""

    def __init__(self, stub: MetadataServiceAsyncStub, after_seq: int) -> None:
        self.call = stub.WatchChanges(pb.WatchChangesRequest(after_seq=after_seq))
        self.received: asyncio.Queue[pb.Change] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for change in self.call:
            await self.received.put(change)

    async def take(self, n: int) -> list[pb.Change]:
        return [await asyncio.wait_for(self.received.get(), PROMPT_S) for _ in range(n)]

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


Serve = Callable[..., AbstractAsyncContextManager["MetadataServiceAsyncStub"]]


@pytest.fixture
def serve(database_url: str) -> Serve:
    """Runs a metadata server (settings overridable) and yields a stub to it."""

    @asynccontextmanager
    async def serve(**overrides: Any) -> AsyncIterator[MetadataServiceAsyncStub]:
        settings = Settings(
            listen="127.0.0.1:0", database_url=database_url, change_poll_s=POLL_S, drain_grace_s=1.0
        )
        async with (
            running(replace(settings, **overrides)) as port,
            create_channel(f"127.0.0.1:{port}") as channel,
        ):
            yield MetadataServiceStub(channel)

    return serve


@pytest.fixture
async def stub(serve: Serve) -> AsyncIterator[MetadataServiceAsyncStub]:
    async with serve() as stub:
        yield stub


@pytest.fixture
async def watch(stub: MetadataServiceAsyncStub) -> AsyncIterator[Callable[[int], Watch]]:
    """Opens watches on the server; closes them all afterwards."""
    opened: list[Watch] = []

    def open_watch(after_seq: int) -> Watch:
        opened.append(Watch(stub, after_seq))
        return opened[-1]

    yield open_watch
    for w in opened:
        await w.close()


def _summary(changes: list[pb.Change]) -> list[tuple[str, str]]:
    return [(c.entity, c.action) for c in changes]


async def test_replay_after_a_seq_then_live(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch]
) -> None:
    alice = (await stub.CreateUser(pb.CreateUserRequest(name="alice"))).user.id
    project = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="pj", name="P"))
    w = watch(2)  # after the user and its first key
    replayed = await w.take(2)
    assert _summary(replayed) == [("project", "created"), ("chain", "created")]
    assert [(c.seq, c.entity_id, c.user_id) for c in replayed] == [
        (3, project.id, alice),
        (4, project.default_chain_id, alice),
    ]

    started = time.monotonic()
    rule = await stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="pj", text="t"))
    [live] = await w.take(1)
    assert (live.seq, live.entity, live.action, live.entity_id) == (5, "rule", "created", rule.id)
    assert time.monotonic() - started < PROMPT_S
    # The next change is the next thing received: nothing was sent twice.
    await stub.DeleteRule(pb.DeleteRuleRequest(user_id=alice, project="pj", rule_id=rule.id))
    assert [(c.seq, c.action) for c in await w.take(1)] == [(6, "deleted")]


async def test_a_watch_from_now_replays_nothing_and_streams_what_follows(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch]
) -> None:
    alice = (await stub.CreateUser(pb.CreateUserRequest(name="alice"))).user.id
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="pj", name="P"))  # seq 3, 4
    w = watch(-1)
    # The headers come once the watch is subscribed: everything after them is delivered.
    await asyncio.wait_for(w.call.initial_metadata(), PROMPT_S)
    rule = await stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="pj", text="t"))
    [first] = await w.take(1)
    assert (first.seq, first.entity, first.entity_id) == (5, "rule", rule.id)
    chain = await stub.CreateChain(pb.CreateChainRequest(user_id=alice, project="pj", name="c"))
    [second] = await w.take(1)
    assert (second.seq, second.entity_id) == (6, chain.id)


async def test_a_replaying_watch_sends_its_headers_before_any_change(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch]
) -> None:
    # Headers commit the call: a client's transparent retry cannot restart a watch mid-way.
    await stub.CreateUser(pb.CreateUserRequest(name="alice"))
    w = watch(0)
    await asyncio.wait_for(w.call.initial_metadata(), PROMPT_S)
    assert [c.seq for c in await w.take(2)] == [1, 2]


async def test_a_watch_before_minus_one_is_refused(stub: MetadataServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.WatchChanges(pb.WatchChangesRequest(after_seq=-2)):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_watcher_resuming_from_its_last_seq_gets_exactly_what_it_missed(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch]
) -> None:
    alice = (await stub.CreateUser(pb.CreateUserRequest(name="alice"))).user.id
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="pj", name="P"))
    first = watch(0)
    seen = await first.take(4)
    await first.close()

    rule = await stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="pj", text="t"))
    await stub.UpdateRule(pb.UpdateRuleRequest(user_id=alice, project="pj", rule_id=rule.id, active=False))
    await stub.DeleteRule(pb.DeleteRuleRequest(user_id=alice, project="pj", rule_id=rule.id))

    resumed = watch(seen[-1].seq)
    missed = await resumed.take(3)
    assert [(c.entity, c.action, c.entity_id) for c in missed] == [
        ("rule", "created", rule.id),
        ("rule", "updated", rule.id),
        ("rule", "deleted", rule.id),
    ]
    chain = await stub.CreateChain(pb.CreateChainRequest(user_id=alice, project="pj", name="c"))
    [live] = await resumed.take(1)
    assert (live.entity, live.entity_id, live.seq) == ("chain", chain.id, missed[-1].seq + 1)


async def test_concurrent_writers_reach_watchers_in_seq_order(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch]
) -> None:
    alice = (await stub.CreateUser(pb.CreateUserRequest(name="alice"))).user.id
    await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="pj", name="P"))
    early = watch(4)
    rules = await asyncio.gather(
        *(stub.CreateRule(pb.CreateRuleRequest(user_id=alice, project="pj", text=f"r{i}")) for i in range(30))
    )
    late = watch(4)  # subscribes while the last changes may still be in flight
    for w in (early, late):
        got = await w.take(30)
        assert [c.seq for c in got] == list(range(5, 35))
        assert {c.entity_id for c in got} == {r.id for r in rules}


async def test_revoking_a_key_from_the_cli_reaches_watchers(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch], database_url: str
) -> None:
    created = await stub.CreateUser(pb.CreateUserRequest(name="alice"))
    w = watch(2)
    await admin.revoke_key(database_url, created.key.id)
    [change] = await w.take(1)
    assert (change.entity, change.action, change.entity_id, change.user_id) == (
        "api_key",
        "revoked",
        created.key.id,
        created.user.id,
    )


async def test_the_listen_connection_heals(
    stub: MetadataServiceAsyncStub, watch: Callable[[int], Watch], database_url: str
) -> None:
    alice = (await stub.CreateUser(pb.CreateUserRequest(name="alice"))).user.id
    w = watch(2)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [LISTENER_NAME],
        )
        assert await cur.fetchall() == [(True,)]
    project = await stub.CreateProject(pb.CreateProjectRequest(user_id=alice, slug="pj", name="P"))
    assert [c.entity_id for c in await w.take(2)] == [project.id, project.default_chain_id]


async def test_shutdown_ends_watches_instead_of_waiting_for_them(database_url: str) -> None:
    settings = Settings(listen="127.0.0.1:0", database_url=database_url, drain_grace_s=30.0)
    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def serve_until_stopped() -> None:
        async with running(settings) as port:
            bound.set_result(port)
            await stop.wait()

    server = asyncio.create_task(serve_until_stopped())
    async with create_channel(f"127.0.0.1:{await bound}") as channel:
        w = Watch(MetadataServiceStub(channel), 0)
        await MetadataServiceStub(channel).CreateUser(pb.CreateUserRequest(name="alice"))
        await w.take(2)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(server, 10.0)
        assert time.monotonic() - started < 5.0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await w.task
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_changes_past_retention_are_pruned(database_url: str) -> None:
    await prepare_schema(database_url)
    await admin.create_user(database_url, "alice")
    await admin.create_user(database_url, "bob")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE metadata.changes SET at = now() - interval '8 days' WHERE seq <= 2")
    async with Store.connected(database_url) as store:
        assert await store.prune_changes(timedelta(days=7)) == 2
        assert [c.seq for c in await store.changes_after(0, 10)] == [3, 4]
        assert await store.last_change_seq() == 4
