"""The job queue against PostgreSQL: claims never overlap, a job taken away rejects its old
holder's writes, expired leases are requeued or ended, hand-backs refund, retries wait; claims
take tenants in turn under a per-tenant cap; tenant counts are recounted; old events are pruned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from services.generation.catalog import Placement
from services.generation.domain import (
    Ended,
    Event,
    NewEvent,
    Output,
    Reference,
    RenderError,
    RenderSpec,
    Submission,
)
from services.generation.instruments import count_finished
from services.generation.jobs import JobPolicy
from services.generation.records import notified_events
from services.generation.store import Store
from services.generation.submissions import insert_render
from services.generation.validation import normalized
from tests.support.observed_stack import install_global_providers

POLICY = JobPolicy(lease_s=30, max_attempts=2)
OUTPUT = Output("/v1/renders/x/output", "image/png", 3, 1, 1, "abc")


def _placement(tenant: str) -> Placement:
    """Where the catalog would place a render of `tenant`: its project's default chain."""
    return Placement(project_id=f"{tenant}-project", project="art", chain_id=f"{tenant}-chain", rules=())


@dataclass
class Queue:
    pool: AsyncConnectionPool
    store: Store
    """The API side's operations."""
    jobs: Store
    """The worker side's: the same store."""
    ended: list[Ended]
    """Renders the store reported as ended, in order."""

    async def submit(self, count: int = 1) -> list[str]:
        renders = [
            await self.store.submit(
                normalized(RenderSpec(project="art", prompt=f"p{i}")),
                _placement("alice"),
                Submission("alice"),
                time.perf_counter(),
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
    ended: list[Ended] = []
    async with Store.opened(
        database_url, name="test", max_size=12, policy=POLICY, on_ended=ended.append
    ) as store:
        yield Queue(store.pool, store, store, ended)


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


async def test_renders_ended_by_the_rescuer_or_a_cancel_are_reported_as_ended(queue: Queue) -> None:
    exhausted, queued = await queue.submit(2)
    await queue.store.cancel("alice", queued)  # queued: cancelled at once
    for _ in range(2):  # both attempts lost with their worker
        assert [c.render_id for c in await queue.jobs.claim("w", 1)] == [exhausted]
        await queue.expire_leases()
        await queue.jobs.rescue()

    cancel, lost = queue.ended
    assert (cancel.render_id, cancel.kind, cancel.status) == (queued, "image", "cancelled")
    assert (lost.render_id, lost.kind, lost.status) == (exhausted, "image", "failed")
    assert lost.error is not None and (lost.error.code, lost.error.reason) == (
        "generation_failed",
        "lease_expired",
    )


async def test_ended_renders_count_as_finished() -> None:
    install_global_providers()  # the counter is made on the process's meter provider

    def finished(**labels: str) -> float:
        return sum(
            sample.value
            for family in REGISTRY.collect()
            for sample in family.samples
            if sample.name == "renderflow_renders_finished_total" and labels.items() <= sample.labels.items()
        )

    lost = {"status": "failed", "render_kind": "video", "error_code": "generation_failed"}
    lost |= {"error_reason": "lease_expired"}
    cancelled = {"status": "cancelled", "render_kind": "image"}
    before = finished(**lost), finished(**cancelled)
    count_finished(Ended("r1", "video", "failed", RenderError("generation_failed", "lease_expired")))
    count_finished(Ended("r2", "image", "cancelled", RenderError("cancelled")))
    assert (finished(**lost), finished(**cancelled)) == (before[0] + 1, before[1] + 1)


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
    started = ["started", "phase"]  # each claim starts the render
    assert await queue.event_types(render_id) == ["queued", *started, "queued", *started, "queued"]


async def _submit_for(queue: Queue, tenant: str, count: int, priority: int = 0) -> list[str]:
    ids = []
    for i in range(count):
        spec = normalized(RenderSpec(project="art", prompt=f"{tenant} {i}", priority=priority))
        submitted = await queue.store.submit(
            spec, _placement(tenant), Submission(tenant), time.perf_counter()
        )
        ids.append(submitted.id)
    return ids


async def test_claims_take_tenants_in_turn_and_priority_within_each(queue: Queue) -> None:
    alice = await _submit_for(queue, "alice", 6)
    bob = await _submit_for(queue, "bob", 2)
    urgent = await _submit_for(queue, "alice", 1, priority=5)

    first = await queue.jobs.claim("w", 4)
    rest = await queue.jobs.claim("w", 10)

    # Round-robin: each tenant's next job in turn, however many the other has queued.
    assert sorted((c.tenant, c.render_id) for c in first) == sorted(
        [("alice", urgent[0]), ("alice", alice[0]), ("bob", bob[0]), ("bob", bob[1])]
    )
    assert [c.render_id for c in rest] == alice[1:]


async def test_the_tenant_cap_holds_and_counts_follow_the_jobs(queue: Queue) -> None:
    capped = Store(queue.pool, policy=replace(POLICY, tenant_max_running=2))
    await _submit_for(queue, "alice", 5)
    await _submit_for(queue, "bob", 1)

    claims = await asyncio.gather(*(capped.claim(f"w{i}", 3) for i in range(4)))
    held = [c for got in claims for c in got]

    assert sorted(c.tenant for c in held) == ["alice", "alice", "bob"]
    assert await capped.claim("w", 3) == []
    assert await _tenants(queue) == {"alice": (3, 2, 0), "bob": (0, 1, 0)}
    await capped.finish(next(c for c in held if c.tenant == "alice"), "succeeded", output=OUTPUT)
    assert [c.tenant for c in await capped.claim("w", 3)] == ["alice"]
    assert await _tenants(queue) == {"alice": (2, 2, 0), "bob": (0, 1, 0)}


async def test_tenant_counts_are_recounted_when_they_drift(queue: Queue) -> None:
    await _submit_for(queue, "alice", 3)
    await queue.jobs.claim("w", 1)
    async with queue.pool.connection() as conn:
        await conn.execute("UPDATE tenants SET waiting = 7, queued = 0")  # as if corrupted
    assert await queue.jobs.recount() == 1
    assert await _tenants(queue) == {"alice": (2, 1, 0)}


async def test_events_of_renders_ended_long_ago_are_pruned(queue: Queue) -> None:
    old, recent, open_ = await queue.submit(3)
    for claim in await queue.jobs.claim("w", 2):
        assert await queue.jobs.finish(claim, "succeeded", output=OUTPUT)
    async with queue.pool.connection() as conn:
        await conn.execute("UPDATE events SET at = now() - interval '8 days' WHERE render_id = %s", [old])
        for render_id, state in ((old, "delivered"), (old, "pending"), (recent, "delivered")):
            await conn.execute(
                "INSERT INTO webhook_deliveries (user_id, render_id, subscription, url, event, seq,"
                " event_at, state) VALUES ('alice', %s, 'render', 'https://h.example', 'completed', 1,"
                " now(), %s)",
                [render_id, state],
            )

    rescued = await queue.jobs.rescue()

    assert rescued.pruned == 1
    assert await queue.event_types(old) == []
    assert (await queue.store.get("alice", old)).status == "succeeded"  # the render stays
    assert await queue.event_types(recent) != [] and await queue.event_types(open_) == ["queued"]
    async with queue.pool.connection() as conn:
        cur = await conn.execute("SELECT render_id, state FROM webhook_deliveries ORDER BY render_id, state")
        kept = await cur.fetchall()
    # Settled deliveries go with the events; one still to be made stays.
    assert sorted(kept) == sorted([(old, "pending"), (recent, "delivered")])


async def _tenants(queue: Queue) -> dict[str, tuple[int, int, int]]:
    async with queue.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT tenant, queued, (SELECT count(*) FROM jobs j WHERE j.tenant = t.tenant"
            " AND j.state = 'running'), waiting FROM tenants t"
        )
        return {row[0]: (row[1], row[2], row[3]) for row in await cur.fetchall()}


async def test_the_stores_connections_are_in_autocommit_mode_from_the_start(queue: Queue) -> None:
    async with queue.pool.connection() as first, queue.pool.connection() as second:
        assert first.autocommit and second.autocommit


async def test_notifications_carry_the_events_they_announce(queue: Queue, database_url: str) -> None:
    """A watcher needs no read of the log: the claim's, a progress write's and the finish's
    notifications carry exactly the events the log holds."""
    listener = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    async with listener:
        await listener.execute("LISTEN generation_events")
        (render_id,) = await queue.submit()
        (claim,) = await queue.jobs.claim("w", 1)
        assert await queue.jobs.progress(claim, [NewEvent("phase", phase="store")], progress=0.5)
        assert await queue.jobs.finish(claim, "succeeded", output=OUTPUT)
        carried: list[Event] = []
        async with asyncio.timeout(5):
            async for note in listener.notifies():
                head, _, body = note.payload.partition("\n")
                if head.startswith(f"{render_id}:") and body:
                    carried += notified_events(render_id, body)
                if any(event.terminal for event in carried):
                    break
    logged = await queue.store.events_after(render_id, 1)  # after `queued`, which its submit announced
    assert carried == logged
    assert [e.type for e in carried] == ["started", "phase", "phase", "succeeded"]


async def test_the_end_of_a_job_does_not_wait_for_its_tenants_row(queue: Queue) -> None:
    """Claims and submits lock a tenant's row through their commit; the end of one of its jobs
    goes ahead while they hold it."""
    await queue.submit()
    (claim,) = await queue.jobs.claim("w", 1)
    async with queue.pool.connection() as holder, holder.transaction():
        await holder.execute("SELECT FROM tenants WHERE tenant = 'alice' FOR UPDATE")
        async with asyncio.timeout(5):
            assert await queue.jobs.finish(claim, "succeeded", output=OUTPUT)


async def test_a_chain_render_submitted_while_its_predecessor_ends_is_released(queue: Queue) -> None:
    """The race the end's check must not lose: the next render of a chain commits while the end of
    the render it waits for is being written, and its own settle ran before that end committed.
    The end sees it (the submit marked the render it waits for), and releases it."""
    (first,) = await queue.submit()
    (claim,) = await queue.jobs.claim("w", 1)
    spec = normalized(RenderSpec(project="art", prompt="next", reference=Reference(chain_previous=True)))
    async with queue.pool.connection() as submitting:
        async with submitting.transaction():
            waiting = await insert_render(
                submitting, spec, _placement("alice"), Submission("alice"), time.perf_counter(), None, 0
            )
            assert waiting.waiting_on == first
            # The end starts now, and waits for the submit's lock on the render it ends.
            ending = asyncio.create_task(queue.jobs.finish(claim, "succeeded", output=OUTPUT))
            await asyncio.sleep(0.2)
            assert not ending.done()
        async with asyncio.timeout(5):
            assert await ending
    released = await queue.store.get("alice", waiting.id)
    assert released.status == "queued" and not released.waiting_on
    assert [c.render_id for c in await queue.jobs.claim("w", 1)] == [waiting.id]
