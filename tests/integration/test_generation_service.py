"""GenerationService over real gRPC and PostgreSQL, with in-process workers: submit to output,
idempotency, validation, batches, cancel, watch resume, tenant isolation, listing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import AsyncIterable, Awaitable

import pytest
from PIL import Image
from renderflow.v1 import common_pb2
from renderflow.v1 import generation_pb2 as pb

from shared.errors import FailedPrecondition, NotFound, ValidationFailed
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    Accounts,
    Stub,
    WorkerFactory,
    events,
    finished,
    get,
    output,
    spec,
    status_name,
    submit,
    submit_batch,
)


async def test_submit_runs_to_a_png_of_the_requested_size(stub: Stub, start_worker: WorkerFactory) -> None:
    await start_worker()
    render = await submit(stub, width=96, height=80, steps=5, seed=7)
    assert status_name(render) == "queued"

    done = await finished(stub, render.id)

    assert status_name(done) == "succeeded"
    assert done.progress == 1.0 and done.attempts == 1
    kinds = [(e.type, e.phase) for e in await events(stub, render.id)]
    assert kinds[:3] == [("queued", ""), ("started", ""), ("phase", "generation")]
    assert kinds[-2:] == [("phase", "store"), ("succeeded", "")]
    assert [t for t, _ in kinds[3:-2]] == ["progress"] * 5
    timings = done.timings
    for name in ("enqueue_ms", "queue_wait_ms", "generation_ms", "store_ms", "total_ms"):
        assert timings.HasField(name), name
    assert not timings.HasField("image_fetch_ms")
    chunks = await output(stub, render.id)
    data = b"".join(c.data for c in chunks)
    assert chunks[0].content_type == "image/png" and chunks[0].total_bytes == len(data) == done.output.bytes
    assert hashlib.sha256(data).hexdigest() == chunks[0].sha256 == done.output.sha256
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", (96, 80))
    assert done.output.url == f"/v1/renders/{render.id}/output"
    middle = await output(stub, render.id, offset=10, length=20)
    assert b"".join(c.data for c in middle) == data[10:30]


async def test_same_render_id_twice_is_one_render(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")
    render_id = str(uuid.uuid4())
    first = await submit(stub, render_id=render_id)
    again = await submit(stub, render_id=render_id, prompt="something else")
    assert again.id == first.id == render_id and again.prompt == first.prompt
    assert again.position == first.position == 1
    with rpc_errors():
        listed = await stub.ListRenders(pb.ListRendersRequest(user_id=alice))
        await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=render_id))  # ends its event log
    assert [r.id for r in listed.renders] == [render_id]
    assert [e.type for e in await events(stub, render_id)] == ["queued", "cancelled"]


async def test_racing_submits_with_one_key_make_one_render(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")
    renders = await asyncio.gather(
        *(submit(stub, idempotency_key="key-1", request_hash="h1") for _ in range(20))
    )
    assert len({r.id for r in renders}) == 1 and {r.position for r in renders} == {1}
    with rpc_errors():
        listed = await stub.ListRenders(pb.ListRendersRequest(user_id=alice))
    assert [r.id for r in listed.renders] == [renders[0].id]
    assert (await submit(stub)).position == 2  # the racers took one position between them


async def test_reused_key_with_another_request_is_invalid(stub: Stub) -> None:
    await submit(stub, idempotency_key="key-2", request_hash="h1")
    with pytest.raises(ValidationFailed) as caught:
        await submit(stub, idempotency_key="key-2", request_hash="h2", prompt="other")
    assert [e.field for e in caught.value.errors] == ["idempotency_key"]
    # The same key is free for another user.
    await submit(stub, user="bob", idempotency_key="key-2", request_hash="h2")


async def test_invalid_specs_name_their_fields(stub: Stub) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await submit(stub, prompt="", width=10, steps=151)
    assert {e.field for e in caught.value.errors} == {"prompt", "params.width", "params.steps"}
    with pytest.raises(ValidationFailed) as caught:
        await submit(stub, kind=pb.RENDER_KIND_UNSPECIFIED, reference=pb.Reference(url="ftp://x/y"))
    assert {e.field for e in caught.value.errors} == {"kind", "reference.url"}


async def test_batch_is_all_or_nothing_and_watchable(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    with pytest.raises(ValidationFailed) as caught:
        await submit_batch(stub, [spec(), spec(width=4096), spec()])
    assert [e.field for e in caught.value.errors] == ["items[1].params.width"]
    with rpc_errors():
        assert not (await stub.ListRenders(pb.ListRendersRequest(user_id=alice))).renders
    batch = await submit_batch(stub, [spec(prompt=f"item {i}") for i in range(3)])
    assert batch.counts.queued == batch.counts.total == 3
    assert [r.position for r in batch.renders] == [1, 2, 3]  # the refused batch took none
    assert [r.prompt for r in batch.renders] == ["item 0", "item 1", "item 2"]
    assert all(r.batch_id == batch.id for r in batch.renders)

    await start_worker()
    with rpc_errors():
        call = stub.WatchBatch(pb.WatchBatchRequest(user_id=alice, batch_id=batch.id))
        seen = await asyncio.wait_for(_collect(call), 30)
        after = await stub.GetBatch(pb.GetBatchRequest(user_id=alice, batch_id=batch.id))
    assert sorted(e.render_id for e in seen if e.type == "succeeded") == sorted(r.id for r in batch.renders)
    assert after.counts.succeeded == 3 and after.counts.queued == 0


async def test_a_repeated_batch_is_the_same_batch(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")

    async def batch(request_hash: str) -> pb.Batch:
        return await submit_batch(
            stub, [spec(), spec()], idempotency_key="batch-1", request_hash=request_hash
        )

    first = await batch("h1")
    again = await batch("h1")
    with rpc_errors():
        listed = await stub.ListRenders(pb.ListRendersRequest(user_id=alice))
    assert again.id == first.id and [r.id for r in again.renders] == [r.id for r in first.renders]
    assert [r.position for r in again.renders] == [1, 2] and len(listed.renders) == 2
    with pytest.raises(ValidationFailed) as caught:
        await batch("h2")
    assert [e.field for e in caught.value.errors] == ["idempotency_key"]
    assert (await submit(stub)).position == 3  # neither the repeat nor the refusal took a position


async def test_a_brief_get_leaves_the_estimates_out(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")
    render = await submit(stub)  # no worker: it stays queued
    with rpc_errors():
        full = await stub.GetRender(pb.GetRenderRequest(user_id=alice, render_id=render.id))
        brief = await stub.GetRender(pb.GetRenderRequest(user_id=alice, render_id=render.id, brief=True))
    assert full.HasField("queue_position") and full.queue_position == 0
    assert not brief.HasField("queue_position") and brief.id == render.id


async def test_cancel_a_queued_render(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")
    render = await submit(stub)
    with rpc_errors():
        cancelled = await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=render.id))
    assert status_name(cancelled) == "cancelled" and cancelled.error.code == "cancelled"
    assert [e.type for e in await events(stub, render.id)] == ["queued", "cancelled"]
    # A repeat changes nothing and says so in its trailers.
    with rpc_errors():
        repeat = stub.Cancel(pb.CancelRequest(user_id=alice, render_id=render.id))
        again = await repeat
        trailers = tuple(await repeat.trailing_metadata() or ())
    assert again.finished_at == cancelled.finished_at and ("renderflow-replayed", "true") in trailers
    assert [e.type for e in await events(stub, render.id)] == ["queued", "cancelled"]


async def test_cancel_a_running_render_stops_it_quickly(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    alice = await accounts.user("alice")
    await start_worker(procedural_step_ms=100)
    render = await submit(stub, steps=100)  # ten seconds of work
    with rpc_errors():
        call = stub.Watch(pb.WatchRequest(user_id=alice, render_id=render.id))
        async for event in call:
            if event.type == "progress":
                break
        asked = asyncio.get_running_loop().time()
        await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=render.id))
        rest = await asyncio.wait_for(
            _collect(stub.Watch(pb.WatchRequest(user_id=alice, render_id=render.id, after_seq=event.seq))),
            5,
        )
    took = asyncio.get_running_loop().time() - asked
    assert rest[-1].type == "cancelled" and took < 1.5
    done = await finished(stub, render.id)
    assert status_name(done) == "cancelled" and not done.HasField("output")
    with pytest.raises(FailedPrecondition):
        await output(stub, render.id)


async def test_watch_resumes_from_any_seq_without_gaps_or_repeats(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    render = await submit(stub, steps=6)
    live = asyncio.create_task(events(stub, render.id))  # watching before any worker runs
    await asyncio.sleep(0.1)
    await start_worker()
    seen = await asyncio.wait_for(live, 30)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].type == "succeeded"
    for k in range(len(seen) + 1):
        resumed = await events(stub, render.id, after_seq=k)
        assert [(e.seq, e.type) for e in resumed] == [(e.seq, e.type) for e in seen[k:]]


async def test_another_users_render_is_not_found(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    bob = await accounts.user("bob")
    await start_worker()
    render = await submit(stub, user="alice")
    await finished(stub, render.id, user="alice")
    calls: list[Awaitable[object]] = [
        stub.GetRender(pb.GetRenderRequest(user_id=bob, render_id=render.id)),
        events(stub, render.id, user="bob"),
        output(stub, render.id, user="bob"),
        stub.Cancel(pb.CancelRequest(user_id=bob, render_id=render.id)),
    ]
    for call in calls:
        with pytest.raises(NotFound), rpc_errors():
            await call


async def test_queue_position_follows_priority(stub: Stub) -> None:
    first = await submit(stub)
    second = await submit(stub)
    urgent = await submit(stub, priority=10)
    positions = {render.id: (await get(stub, render.id)).queue_position for render in (first, second, urgent)}
    assert positions == {urgent.id: 0, first.id: 1, second.id: 2}


async def test_list_pages_newest_first_and_by_chain_position(stub: Stub, accounts: Accounts) -> None:
    alice = await accounts.user("alice")
    project = await accounts.project()
    chain = await accounts.chain()
    ids = [(await submit(stub, chain_id=chain)).id for _ in range(5)]
    await accounts.project(slug="other")
    await submit(stub, project="other")
    pages, token = [], ""
    while True:
        with rpc_errors():
            page = await stub.ListRenders(
                pb.ListRendersRequest(user_id=alice, project_id=project.id, page=_page(2, token))
            )
        pages.append([r.id for r in page.renders])
        token = page.next_page_token
        if not token:
            break
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    with rpc_errors():
        in_chain = await stub.ListRenders(
            pb.ListRendersRequest(user_id=alice, chain_id=chain, by_position=True)
        )
        queued = await stub.ListRenders(
            pb.ListRendersRequest(user_id=alice, status=pb.RENDER_STATUS_QUEUED, page=_page(100, ""))
        )
    assert [(r.id, r.position) for r in in_chain.renders] == [
        (render_id, i + 1) for i, render_id in enumerate(ids)
    ]
    assert len(queued.renders) == 6
    with pytest.raises(ValidationFailed), rpc_errors():
        await stub.ListRenders(pb.ListRendersRequest(user_id=alice, page=_page(2, "garbage")))


def _page(size: int, token: str) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=size, page_token=token)


async def _collect(call: AsyncIterable[pb.RenderEvent]) -> list[pb.RenderEvent]:
    return [event async for event in call]
