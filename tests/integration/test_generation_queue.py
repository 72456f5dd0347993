"""The job queue against PostgreSQL: claims never overlap, a job taken away rejects its old
holder's writes, expired leases are requeued or ended, hand-backs refund, retries wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from psycopg_pool import AsyncConnectionPool

from services.generation.domain import Output, RenderSpec, Submission
from services.generation.jobs import JobQueue
from services.generation.server import MIGRATIONS, SCHEMA
from services.generation.server import database_url as with_schema
from services.generation.storage import RenderStore
from services.generation.validation import normalized
from shared.db import migrate, open_pool

OUTPUT = Output("/v1/renders/x/output", "image/png", 3, 1, 1, "abc")


@dataclass
class Queue:
    pool: AsyncConnectionPool
    store: RenderStore
    jobs: JobQueue

    async def submit(self, count: int = 1) -> list[str]:
        renders = [
            await self.store.submit(
                normalized(RenderSpec(prompt=f"p{i}")), Submission("alice"), time.perf_counter()
            )
            for i in range(count)
        ]
        return [r.id for r in renders]

    async def expire_leases(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")

    async def event_types(self, render_id: str) -> list[str]:
        return [e.type for e in await self.store.events_after(render_id, 0)]


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[Queue]:
    await migrate(database_url, SCHEMA, MIGRATIONS)
    pool = await open_pool(with_schema(database_url), name="test", max_size=12)
    try:
        yield Queue(pool, RenderStore(pool), JobQueue(pool, lease_s=30, max_attempts=2))
    finally:
        await pool.close()


async def test_concurrent_claims_never_share_a_job(queue: Queue) -> None:
    ids = await queue.submit(40)

    async def claimer(name: str) -> list[str]:
        mine: list[str] = []
        while claims := await queue.jobs.claim(name, 3):
            mine += [c.render_id for c in claims]
        return mine

    taken = await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    flat = [render_id for got in taken for render_id in got]
    assert sorted(flat) == sorted(ids)  # every job once, none twice


async def test_a_job_taken_away_rejects_its_old_holders_writes(queue: Queue) -> None:
    (render_id,) = await queue.submit()
    (old,) = await queue.jobs.claim("old", 1)
    await queue.expire_leases()
    assert (await queue.jobs.rescue()).requeued == 1
    (new,) = await queue.jobs.claim("new", 1)
    assert new.attempts == 2 and new.lease_token != old.lease_token

    assert await queue.jobs.heartbeat([old, new]) == {render_id: False}
    assert not await queue.jobs.progress(old, [])
    assert not await queue.jobs.finish(old, "succeeded", output=OUTPUT)
    assert not await queue.jobs.requeue(old, 0, "no")
    assert await queue.jobs.finish(new, "succeeded", output=OUTPUT)
    assert not await queue.jobs.finish(new, "succeeded", output=OUTPUT)  # finishing twice is harmless

    types = await queue.event_types(render_id)
    assert types.count("succeeded") == 1 and types[-1] == "succeeded"
    assert await queue.jobs.counts() == {}  # the claim table is empty again


async def test_expired_leases_out_of_attempts_fail_and_cancelled_ones_cancel(queue: Queue) -> None:
    exhausted, cancelled = await queue.submit(2)
    claims = await queue.jobs.claim("w", 2)
    await queue.store.cancel("alice", cancelled)  # running: only flagged
    assert await queue.jobs.heartbeat(claims) == {exhausted: False, cancelled: True}
    await queue.expire_leases()
    await queue.jobs.rescue()  # attempt 1 of 2 lost: requeued
    claims = await queue.jobs.claim("w", 2)
    assert [c.render_id for c in claims] == [exhausted]
    await queue.expire_leases()
    rescued = await queue.jobs.rescue()
    assert (rescued.failed, rescued.requeued) == (1, 0)
    failed = await queue.store.get("alice", exhausted)
    assert failed.status == "failed" and failed.error is not None and failed.error.reason == "lease_expired"
    assert (await queue.store.get("alice", cancelled)).status == "cancelled"


async def test_a_hand_back_refunds_the_attempt_and_a_retry_waits(queue: Queue) -> None:
    (render_id,) = await queue.submit()
    (claim,) = await queue.jobs.claim("w", 1)
    assert await queue.jobs.requeue(claim, 0, "handed back", refund=True)
    (claim,) = await queue.jobs.claim("w", 1)
    assert claim.attempts == 1
    assert await queue.jobs.requeue(claim, 30, "retry later")
    assert await queue.jobs.claim("w", 1) == []
    render = await queue.store.get("alice", render_id)
    assert render.status == "queued"
    assert await queue.event_types(render_id) == ["queued", "queued", "queued"]
