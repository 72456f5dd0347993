"""Fairness and limits with real workers: a small tenant is not starved by a big one, the per-tenant
running cap holds across workers, a backend's rate limit holds across workers, a render past its
kind's maximum duration fails with `timeout` and frees its slot, stalls are flagged and counted,
and the per-user quota refuses submits atomically."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections import Counter
from datetime import UTC, datetime

import psycopg
import pytest
from PIL import Image
from renderflow.v1 import common_pb2
from renderflow.v1 import generation_pb2 as pb

from services.generation.backends import Artifact, GenerationInput, ProgressCallback
from services.generation.store import Store
from shared.errors import QuotaExceeded
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    Accounts,
    ServerFactory,
    Stub,
    WorkerFactory,
    finished,
    get,
    spec,
    status_name,
    submit,
    submit_batch,
)


class Recorder:
    """A backend that notes when each call starts (and on which worker), takes `step_s` per step,
    and never ends for a prompt of `hang`, nor after its first step for `stall` until released."""

    name = "procedural"

    def __init__(self, label: str = "", starts: list[tuple[float, str]] | None = None, step_s: float = 0.0):
        self.label = label
        self.starts = [] if starts is None else starts
        self.step_s = step_s
        self.release = asyncio.Event()
        self.cancelled = 0

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        self.starts.append((time.monotonic(), self.label))
        try:
            if job.prompt == "hang":
                await asyncio.Event().wait()
            for step in range(1, job.steps + 1):
                await asyncio.sleep(self.step_s)
                await on_progress(step, job.steps)
                if job.prompt == "stall":
                    await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        out = io.BytesIO()
        Image.new("RGB", (job.width, job.height), "grey").save(out, "PNG")
        return Artifact(out.getvalue(), "image/png", job.width, job.height)


async def _batch(stub: Stub, user: str, count: int, **fields: object) -> pb.Batch:
    return await submit_batch(stub, [spec(**fields) for _ in range(count)], user)


async def test_a_small_tenant_is_not_starved_by_a_big_one(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    alice, bob = await accounts.user("alice"), await accounts.user("bob")
    # The cap is above the worker's 4 slots: only taking tenants in turn lets bob in early.
    await start_worker(concurrency=4, tenant_max_running=8, procedural_step_ms=25)
    for _ in range(4):
        await _batch(stub, "alice", 50, steps=4)  # 200 renders of about 100 ms
    bobs = await _batch(stub, "bob", 5, steps=4)

    with rpc_errors():
        async for event in stub.WatchBatch(pb.WatchBatchRequest(user_id=bob, batch_id=bobs.id)):
            if event.type == "started":
                first_start = event.at.ToDatetime()
                break
        done = await stub.ListRenders(
            pb.ListRendersRequest(
                user_id=alice, status=pb.RENDER_STATUS_SUCCEEDED, page=common_pb2.PageRequest(page_size=200)
            )
        )
    finished_before = [r for r in done.renders if r.finished_at.ToDatetime() <= first_start]
    assert len(finished_before) < 20  # first come, first served would have been all 200


async def test_the_tenant_cap_holds_across_workers(
    stub: Stub, start_worker: WorkerFactory, database_url: str, accounts: Accounts
) -> None:
    alice, bob = await accounts.user("alice"), await accounts.user("bob")  # the tenants
    for name in ("w1", "w2"):
        await start_worker(worker_id=name, concurrency=4, tenant_max_running=2, procedural_step_ms=20)
    batches = [await _batch(stub, user, 12, steps=2) for user in ("alice", "bob")]
    peaks: Counter[str] = Counter()

    async def sample() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT tenant, count(*) FROM generation.jobs WHERE state = 'running' GROUP BY tenant"
                )
                for tenant, running in await cur.fetchall():
                    peaks[tenant] = max(peaks[tenant], running)
                await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        for batch, user in zip(batches, ("alice", "bob"), strict=True):
            for render in batch.renders:
                assert status_name(await finished(stub, render.id, user)) == "succeeded"
    finally:
        sampler.cancel()
    assert peaks == {alice: 2, bob: 2}


async def test_a_tenant_submitting_while_anothers_long_renders_fill_the_queue_starts_at_once(
    stub: Stub, start_worker: WorkerFactory, database_url: str, accounts: Accounts
) -> None:
    alice, bob = await accounts.user("alice"), await accounts.user("bob")
    for name in ("w1", "w2"):  # 4 slots in all; one is kept from any one tenant
        await start_worker(worker_id=name, concurrency=2, tenant_reserved_slots=1, procedural_step_ms=300)
    longs = await _batch(stub, "alice", 6, steps=100)  # 30 s each: more than every slot
    with rpc_errors():
        started = 0
        async with asyncio.timeout(10):
            async for event in stub.WatchBatch(pb.WatchBatchRequest(user_id=alice, batch_id=longs.id)):
                started += event.type == "started"
                if started == 3:
                    break

        short = (await _batch(stub, "bob", 1, steps=1)).renders[0]
        async with asyncio.timeout(10):
            async for event in stub.Watch(pb.WatchRequest(user_id=bob, render_id=short.id)):
                if event.type == "started":
                    break
        waited_s = (event.at.ToDatetime() - short.created_at.ToDatetime()).total_seconds()
        assert waited_s < 2.0  # not after one of alice's 30 s renders
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM generation.jobs WHERE state = 'running' AND tenant = %s", [alice]
            )
            assert await cur.fetchone() == (3,)  # the cost: alone, alice runs on 3 of the 4 slots
        for render in longs.renders:
            await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=render.id))


async def test_a_backend_rate_limit_holds_across_workers(stub: Stub, start_worker: WorkerFactory) -> None:
    starts: list[tuple[float, str]] = []
    for name in ("w1", "w2"):
        await start_worker(
            backends={"procedural": Recorder(name, starts)},
            worker_id=name,
            concurrency=4,
            tenant_max_running=0,
            backend_rate_limits={"procedural": 10.0},
        )
    batch = await _batch(stub, "alice", 12, steps=1)
    for render in batch.renders:
        assert status_name(await finished(stub, render.id)) == "succeeded"

    times = sorted(t for t, _ in starts)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 12 and {label for _, label in starts} == {"w1", "w2"}
    assert min(gaps) > 0.08  # one call per 0.1 s, give or take the clocks' jitter
    assert (len(times) - 1) / (times[-1] - times[0]) <= 10.5


async def test_past_its_maximum_duration_a_render_fails_and_frees_its_slot(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    backend = Recorder()
    await start_worker(backends={"procedural": backend}, concurrency=1, max_duration_image_s=0.3)
    hung = await submit(stub, prompt="hang")
    after = await submit(stub)

    failed = await finished(stub, hung.id)

    assert status_name(failed) == "failed" and failed.attempts == 1 and backend.cancelled == 1
    assert (failed.error.code, failed.error.reason, failed.error.retryable) == (
        "timeout",
        "max_duration",
        False,
    )
    assert "0.3 s" in failed.error.message
    assert status_name(await finished(stub, after.id)) == "succeeded"  # the one slot was freed


async def test_a_render_without_progress_is_flagged_and_counted_as_stalled(
    start_server: ServerFactory, start_worker: WorkerFactory, database_url: str, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    stub = await start_server(stall_after_s=1.0)
    backend = Recorder()
    await start_worker(backends={"procedural": backend})
    render = await submit(stub, prompt="stall", steps=3)
    async with Store.opened(database_url, name="test", max_size=2) as store:
        with rpc_errors():
            async for event in stub.Watch(pb.WatchRequest(user_id=alice, render_id=render.id)):
                if event.type == "progress":
                    break
        current = await get(stub, render.id)
        assert not current.stalled
        # Stalled once a second has passed since its last progress.
        quiet_s = (datetime.now(UTC) - current.last_progress_at.ToDatetime(tzinfo=UTC)).total_seconds()
        await asyncio.sleep(1.1 - quiet_s)
        current = await get(stub, render.id)
        assert status_name(current) == "running" and current.stalled
        assert await store.count_stalled(1.0) == 1

        backend.release.set()
        done = await finished(stub, render.id)
        assert status_name(done) == "succeeded" and not done.stalled
        assert await store.count_stalled(1.0) == 0


async def test_the_quota_refuses_submits_over_it_atomically(
    start_server: ServerFactory, accounts: Accounts
) -> None:
    alice, bob = await accounts.user("alice"), await accounts.user("bob")
    stub = await start_server(max_active_renders=3)
    first = await submit(stub, render_id="r1")
    await submit(stub)
    racing = await asyncio.gather(*(submit(stub) for _ in range(4)), return_exceptions=True)

    assert sum(isinstance(r, pb.Render) for r in racing) == 1
    refused = [r for r in racing if isinstance(r, QuotaExceeded)]
    assert len(refused) == 3 and all(r.retry_after >= 1 for r in refused)
    assert (await submit(stub, render_id="r1")).id == first.id  # a repeat is not a new render
    with pytest.raises(QuotaExceeded):
        await submit_batch(stub, [spec() for _ in range(4)], "bob")
    await submit(stub, user="bob")  # another user's quota is their own
    with rpc_errors():
        listed = await stub.ListRenders(pb.ListRendersRequest(user_id=bob))
        await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=first.id))
    assert (
        len(listed.renders) == 1 and listed.renders[0].position == 1
    )  # the refused batch left nothing behind
    made = await submit(stub)  # a cancelled render makes room
    assert made.position == 4  # and the refused submits took no position: the chain has no gap
