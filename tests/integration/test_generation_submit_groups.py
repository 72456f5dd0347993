"""Group commit of one user's submits, on a real PostgreSQL: submits that queue behind one of their
user's commit together in one transaction, each keeps its own answer, a database error in a group
costs the others nothing but time, and another user's submits never wait for them."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from services.generation.submit_groups import SubmitGroups, Work
from shared.errors import QuotaExceeded

Row = tuple[str, int]
"""What a submit wrote: its label, and the id of the transaction that wrote it."""


@pytest.fixture
async def table(database_url: str) -> AsyncIterator[str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE written (label text PRIMARY KEY, txid bigint NOT NULL)")
    yield database_url


def connections(url: str) -> Callable[[], AbstractAsyncContextManager[AsyncConnection[Any]]]:
    @asynccontextmanager
    async def connection() -> AsyncIterator[AsyncConnection[Any]]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            yield conn

    return connection


def write(label: str, held: asyncio.Event | None = None) -> Work[Row]:
    async def work(conn: AsyncConnection[Any]) -> Row:
        if held is not None:
            await held.wait()
        cur = await conn.execute(
            "INSERT INTO written VALUES (%s, txid_current()) RETURNING label, txid", [label]
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    return work


async def written(url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT label, txid FROM written")
        return {label: txid for label, txid in await cur.fetchall()}


async def queue_behind(
    groups: SubmitGroups[Row],
    user: str,
    first: Work[Row],
    works: list[Work[Row]],
) -> tuple[asyncio.Task[Row], list[asyncio.Task[Row]]]:
    """Starts `first` (which holds until released) and then `works`, all of `user`; returns once
    every one of `works` waits for the group after `first`."""
    leader = asyncio.create_task(groups.run(user, first))
    await asyncio.sleep(0)  # a task's first step runs in the loop's next turn: it is being written
    assert groups.queued(user) == 0
    followers = [asyncio.create_task(groups.run(user, work)) for work in works]
    await asyncio.sleep(0)
    assert groups.queued(user) == len(works)
    return leader, followers


async def test_submits_queued_behind_one_commit_together_each_with_its_own_answer(table: str) -> None:
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))
    held = asyncio.Event()
    leader, followers = await queue_behind(
        groups, "alice", write("first", held), [write(f"r{n}") for n in range(9)]
    )
    assert await written(table) == {}  # nothing is written before the first submit is
    held.set()

    first = await leader
    answers = await asyncio.gather(*followers)
    assert [label for label, _ in answers] == [f"r{n}" for n in range(9)]  # in the order they came
    assert len({txid for _, txid in answers}) == 1  # one transaction for all nine
    assert answers[0][1] != first[1]
    rows = await written(table)
    assert rows == {"first": first[1], **dict(answers)}  # and all of them committed
    assert groups.queued("alice") is None


async def test_a_submit_refused_in_a_group_leaves_the_others_written(table: str) -> None:
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))

    async def refused(conn: AsyncConnection[Any]) -> Row:
        await conn.execute("SELECT 1")
        raise QuotaExceeded("too many", retry_after=2.0)

    held = asyncio.Event()
    leader, followers = await queue_behind(
        groups, "alice", write("first", held), [write("a"), refused, write("b")]
    )
    held.set()
    await leader
    results = await asyncio.gather(*followers, return_exceptions=True)

    assert isinstance(results[1], QuotaExceeded) and results[1].retry_after == 2.0
    assert set(await written(table)) == {"first", "a", "b"}


async def test_a_database_error_in_a_group_costs_the_others_nothing(table: str) -> None:
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))
    held = asyncio.Event()
    # The duplicate fails at the database, which loses the group's transaction: "a" and "b" are
    # written again, each on its own.
    leader, followers = await queue_behind(
        groups, "alice", write("first", held), [write("a"), write("first"), write("b")]
    )
    held.set()
    await leader
    results = await asyncio.gather(*followers, return_exceptions=True)

    assert isinstance(results[1], psycopg.errors.UniqueViolation)
    assert results[0][0] == "a" and results[2][0] == "b"  # type: ignore[index]
    rows = await written(table)
    assert set(rows) == {"first", "a", "b"} and rows["a"] != rows["b"]


async def test_another_users_submits_do_not_wait(table: str) -> None:
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))
    held = asyncio.Event()
    leader, followers = await queue_behind(groups, "alice", write("first", held), [write("a")])

    async with asyncio.timeout(5):
        assert (await groups.run("bob", write("bob's")))[0] == "bob's"
    assert set(await written(table)) == {"bob's"}
    held.set()
    await asyncio.gather(leader, *followers)
    assert set(await written(table)) == {"bob's", "first", "a"}


async def test_a_cancelled_leader_does_not_strand_the_queued_submits(table: str) -> None:
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))
    leader, followers = await queue_behind(groups, "alice", write("first", asyncio.Event()), [write("a")])
    leader.cancel()
    async with asyncio.timeout(5):
        assert (await followers[0])[0] == "a"
    assert set(await written(table)) == {"a"}
    await groups.close()


CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")


async def test_each_grouped_submit_runs_in_its_callers_context(table: str) -> None:
    """What a submit's statements record (their spans) belongs to the request that made it, not to
    the one whose write its group followed."""
    groups: SubmitGroups[Row] = SubmitGroups(connections(table))

    def as_caller(label: str, held: asyncio.Event | None = None) -> Work[Row]:
        async def work(conn: AsyncConnection[Any]) -> Row:
            if held is not None:
                await held.wait()
            return CALLER.get(), 0

        return work

    async def call(label: str, work: Work[Row]) -> Row:
        CALLER.set(label)
        return await groups.run("alice", work)

    held = asyncio.Event()
    leader = asyncio.create_task(call("first", as_caller("first", held)))
    await asyncio.sleep(0)
    followers = [asyncio.create_task(call(f"r{n}", as_caller(f"r{n}"))) for n in range(3)]
    await asyncio.sleep(0)
    assert groups.queued("alice") == 3
    held.set()
    assert (await leader)[0] == "first"
    assert [caller for caller, _ in await asyncio.gather(*followers)] == ["r0", "r1", "r2"]
