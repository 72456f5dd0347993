"""Chains: a render whose reference is the previous render of its chain waits for it (showing what
it waits on), then runs on its output; when the predecessor fails or is cancelled it fails with
`dependency_failed`, and so on down the chain; predecessors submitted late are waited for, a
position never used is skipped after a while, and a chain with nothing before the render fails it."""

from __future__ import annotations

import io
import itertools
from typing import Any

from PIL import Image
from renderflow.v1 import generation_pb2 as pb

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    Stub,
    WorkerFactory,
    events,
    finished,
    spec,
    status_name,
    submit,
)

PREVIOUS = pb.Reference(chain_previous=True)


async def _chain(stub: Stub, *prompts: str, chain_id: str = "chain-1", start: int = 1) -> list[pb.Render]:
    return [
        await submit(stub, chain_id=chain_id, position=start + i, reference=PREVIOUS, prompt=prompt, seed=4)
        for i, prompt in enumerate(prompts)
    ]


async def _messages(stub: Stub, render_id: str, event_type: str) -> list[str]:
    return [e.message for e in await events(stub, render_id) if e.type == event_type]


class RefusesDoomed:
    """Paints grey, except for a prompt of `doomed`, which it refuses for good."""

    name = "procedural"

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        await on_progress(1, 1)
        if job.prompt == "doomed":
            raise PermanentBackendError("prompt refused", "content_policy")
        out = io.BytesIO()
        Image.new("RGB", (job.width, job.height), "grey").save(out, "PNG")
        return Artifact(out.getvalue(), "image/png", job.width, job.height)


async def test_a_chain_runs_in_order_each_on_its_predecessors_output(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    first, second, third = await _chain(stub, "a red fox", "a blue whale", "a blue whale")
    assert not first.HasField("reference")  # the first of a chain has nothing before it
    assert (first.waiting_on, second.waiting_on, third.waiting_on) == ("", first.id, second.id)
    assert status_name(third) == "queued" and not third.HasField("queue_position")
    assert second.reference.chain_previous

    await start_worker()
    done = [await finished(stub, r.id) for r in (first, second, third)]
    plain = [
        await finished(stub, (await submit(stub, prompt=p, seed=4)).id) for p in ("a red fox", "a blue whale")
    ]

    assert [status_name(r) for r in done] == ["succeeded"] * 3
    assert not any(r.waiting_on for r in done)
    for before, after in itertools.pairwise(done):
        assert after.started_at.ToDatetime() >= before.finished_at.ToDatetime()
    # The first ran like a render without reference; the second was shaped by the first's output.
    assert done[0].output.sha256 == plain[0].output.sha256
    assert done[1].output.sha256 != plain[1].output.sha256
    assert await _messages(stub, second.id, "queued") == [
        f"waiting for the previous render of the chain, {first.id}",
        f"the previous render of the chain, {first.id}, has succeeded",
    ]
    notes = [m for m in await _messages(stub, third.id, "phase") if m]
    assert notes == [f"reference: the output of {second.id}, the previous render of the chain"]


async def test_when_the_middle_of_a_chain_fails_the_rest_fails_with_dependency_failed(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    first, second, third = await _chain(stub, "fine", "doomed", "never runs")
    await start_worker(backends={"procedural": RefusesDoomed()})

    done = [await finished(stub, r.id) for r in (first, second, third)]

    assert [status_name(r) for r in done] == ["succeeded", "failed", "failed"]
    assert done[1].error.code == "generation_failed"
    error = done[2].error
    assert (error.code, error.reason, error.retryable) == ("dependency_failed", "failed", False)
    assert second.id in error.message and done[2].attempts == 0
    assert [e.type for e in await events(stub, third.id)] == ["queued", "failed"]


async def test_cancelling_a_render_fails_its_chain_at_once(stub: Stub) -> None:
    first, second, third = await _chain(stub, "a", "b", "c")
    with rpc_errors():
        await stub.Cancel(pb.CancelRequest(user_id="alice", render_id=first.id))
        after = [
            await stub.GetRender(pb.GetRenderRequest(user_id="alice", render_id=r.id))
            for r in (second, third)
        ]
    assert [(status_name(r), r.error.code, r.error.reason) for r in after] == [
        ("failed", "dependency_failed", "cancelled"),
        ("failed", "dependency_failed", "failed"),
    ]


async def test_a_predecessor_submitted_late_is_waited_for(stub: Stub, start_worker: WorkerFactory) -> None:
    (second,) = await _chain(stub, "second", start=2)
    assert second.waiting_on == "" and status_name(second) == "queued"
    (first,) = await _chain(stub, "first")
    await start_worker()

    done = [await finished(stub, r.id) for r in (first, second)]

    assert [status_name(r) for r in done] == ["succeeded", "succeeded"]
    assert done[1].started_at.ToDatetime() >= done[0].finished_at.ToDatetime()


async def test_a_predecessor_never_submitted_fails_the_render_after_a_while(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    await start_worker(chain_wait_s=0.2)
    (orphan,) = await _chain(stub, "orphan", start=5)
    done = await finished(stub, orphan.id)
    assert status_name(done) == "failed"
    assert (done.error.code, done.error.reason) == ("dependency_failed", "missing")
    assert "before position 5 of chain chain-1" in done.error.message


async def test_a_position_never_used_is_skipped_after_the_chain_wait(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    # Position 2 was allocated but its submit never came (refused by the quota, say).
    (first,) = await _chain(stub, "first")
    (third,) = await _chain(stub, "third", start=3)
    await start_worker(chain_wait_s=0.3)

    done = await finished(stub, third.id)

    assert status_name(done) == "succeeded"
    notes = await _messages(stub, third.id, "queued")
    assert any(first.id in note for note in notes), notes


async def test_a_batch_can_be_a_chain(stub: Stub, start_worker: WorkerFactory) -> None:
    items: list[Any] = [spec(chain_id="c2", position=i, reference=PREVIOUS) for i in (1, 2, 3)]
    with rpc_errors():
        batch = await stub.SubmitBatch(pb.SubmitBatchRequest(user_id="alice", renders=items))
    assert [r.waiting_on for r in batch.renders] == ["", batch.renders[0].id, batch.renders[1].id]
    assert batch.counts.queued == 3
    await start_worker()
    done = [await finished(stub, r.id) for r in batch.renders]
    assert [status_name(r) for r in done] == ["succeeded"] * 3
    with rpc_errors():
        after = await stub.GetBatch(pb.GetBatchRequest(user_id="alice", batch_id=batch.id))
    assert after.counts.succeeded == 3
