"""Chains: a render whose reference is the previous render of its chain waits for it (showing what
it waits on), then runs on its output (the last frame of a video). A render that failed or was
cancelled is skipped: its successors continue from the nearest earlier render that succeeded. With
none to continue from, a chain render runs without a reference, or fails with `dependency_failed`
when its reference is required. Generation allocates the positions, in submit order; should one
be taken and never used, it is skipped after a while."""

from __future__ import annotations

import asyncio
import io
import itertools
from pathlib import Path
from typing import Any

import psycopg
from PIL import Image
from renderflow.v1 import generation_pb2 as pb

from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
)
from services.generation.backends.procedural import ProceduralBackend
from services.generation.backends.video import ffmpeg
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
    user_id,
)

PREVIOUS = pb.Reference(chain_previous=True)
REQUIRED = pb.Reference(chain_previous=True, required=True)


async def _chain(stub: Stub, chain_id: str, *prompts: str) -> list[pb.Render]:
    """A render per prompt at the chain's next positions, each continuing from the one before it."""
    return [
        await submit(stub, chain_id=chain_id, reference=PREVIOUS, prompt=prompt, seed=4) for prompt in prompts
    ]


async def _video(stub: Stub, chain_id: str) -> pb.Render:
    """A short 96 x 64 video at the chain's next position, continuing from the render before it."""
    return await submit(
        stub,
        kind=pb.RENDER_KIND_VIDEO,
        chain_id=chain_id,
        reference=PREVIOUS,
        width=96,
        height=64,
        duration_s=1.0,
        fps=6,
    )


async def _skip_positions(database_url: str, user: str, chain_id: str, count: int = 1) -> None:
    """As if the chain's next `count` positions had been taken by submits that never made their
    renders (which generation, allocating a position as it inserts the render, never does): the
    case the chain wait is for."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO generation.chain_positions AS c (chain_id, user_id, last) VALUES (%s, %s, %s)"
            " ON CONFLICT (chain_id) DO UPDATE SET last = c.last + excluded.last",
            [chain_id, user, count],
        )


async def _messages(stub: Stub, render_id: str, event_type: str) -> list[str]:
    return [e.message for e in await events(stub, render_id) if e.type == event_type]


async def _output(stub: Stub, render_id: str) -> bytes:
    return b"".join(chunk.data for chunk in await output(stub, render_id))


async def _frames(video: bytes, tmp_path: Path) -> tuple[bytes, bytes]:
    """The first and last frames of a 96 x 64 MP4 as RGB, every frame decoded by ffmpeg."""
    path = tmp_path / "video.mp4"
    path.write_bytes(video)
    process = await asyncio.create_subprocess_exec(
        ffmpeg(),
        *("-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"),
        stdout=asyncio.subprocess.PIPE,
    )
    raw, _ = await process.communicate()
    size = 96 * 64 * 3
    assert process.returncode == 0 and len(raw) % size == 0 and len(raw) > size
    return raw[:size], raw[-size:]


def _decoded(image: bytes | None) -> Image.Image:
    assert image is not None
    return Image.open(io.BytesIO(image)).convert("RGB")


class Recording:
    """The procedural backend, keeping the reference each render was given; it refuses a prompt
    of `doomed` for good."""

    name = "procedural"

    def __init__(self) -> None:
        self.references: dict[str, bytes | None] = {}
        self._procedural = ProceduralBackend()

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        self.references[job.render_id] = job.reference
        if job.prompt == "doomed":
            raise PermanentBackendError("prompt refused", "content_policy")
        return await self._procedural.generate(job, on_progress)


async def test_a_chain_runs_in_order_each_on_its_predecessors_output(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    chain = await accounts.chain()
    first, second, third = await _chain(stub, chain, "a red fox", "a blue whale", "a blue whale")
    assert [(r.chain_id, r.position) for r in (first, second, third)] == [(chain, 1), (chain, 2), (chain, 3)]
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
    # What it waits on is its `waiting_on` (above); its events say when that one has succeeded.
    assert await _messages(stub, second.id, "queued") == [
        "waiting for the previous render of the chain",
        f"the previous render of the chain, {first.id}, has succeeded",
    ]
    notes = [m for m in await _messages(stub, third.id, "phase") if m]
    assert notes == [f"reference: the output of {second.id}, position 2 of the chain"]


async def test_racing_submits_to_a_chain_each_continue_from_the_one_before(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    chain = await accounts.chain()
    racing = await asyncio.gather(
        *(submit(stub, chain_id=chain, reference=PREVIOUS, prompt=f"frame {i}") for i in range(12))
    )
    in_order = sorted(racing, key=lambda r: r.position)
    assert [r.position for r in in_order] == list(range(1, 13))  # never shared, no gap
    backend = Recording()
    await start_worker(backends={"procedural": backend})

    done = [await finished(stub, r.id) for r in in_order]

    assert [status_name(r) for r in done] == ["succeeded"] * 12
    assert backend.references[in_order[0].id] is None
    for before, after in itertools.pairwise(done):
        assert after.started_at.ToDatetime() >= before.finished_at.ToDatetime()
        assert backend.references[after.id] == await _output(stub, before.id)


async def test_a_render_after_a_video_continues_from_its_last_frame(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts, tmp_path: Path
) -> None:
    chain = await accounts.chain()
    backend = Recording()
    await start_worker(backends={"procedural": backend})
    first, second = await _video(stub, chain), await _video(stub, chain)
    (image,) = await _chain(stub, chain, "a blue whale")
    assert [r.position for r in (first, second, image)] == [1, 2, 3]

    done = [await finished(stub, r.id) for r in (first, second, image)]

    assert [status_name(r) for r in done] == ["succeeded"] * 3, [r.error for r in done]
    for video, after in ((first, second), (second, image)):
        opening, ending = await _frames(await _output(stub, video.id), tmp_path)
        assert opening != ending  # so that the frame used is told apart
        reference = _decoded(backend.references[after.id])
        assert (reference.size, reference.tobytes()) == ((96, 64), ending)
    notes = [m for m in await _messages(stub, image.id, "phase") if m]
    assert notes == [f"reference: the last frame of {second.id}, position 2 of the chain"]


async def test_a_failed_render_is_skipped_and_its_chain_continues_from_the_one_before(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    chain = await accounts.chain()
    first, second, third, fourth = await _chain(stub, chain, "fine", "doomed", "a blue whale", "a red fox")
    backend = Recording()
    await start_worker(backends={"procedural": backend})

    done = [await finished(stub, r.id) for r in (first, second, third, fourth)]

    assert [status_name(r) for r in done] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert (done[1].error.code, done[1].error.reason) == ("generation_failed", "content_policy")
    assert backend.references[third.id] == await _output(stub, first.id)
    assert backend.references[fourth.id] == await _output(stub, third.id)
    assert (await _messages(stub, third.id, "queued"))[-1] == (
        f"continuing from {first.id}, the nearest earlier render of the chain that succeeded"
        f" ({second.id} has failed)"
    )
    notes = [m for m in await _messages(stub, third.id, "phase") if m]
    assert notes == [f"reference: the output of {first.id}, position 1 of the chain"]


async def test_with_nothing_succeeded_before_it_a_chain_render_runs_without_reference_unless_required(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts
) -> None:
    alice, chain = await accounts.user("alice"), await accounts.chain()
    first = await submit(stub, chain_id=chain, prompt="a", seed=4)
    second = await submit(stub, chain_id=chain, reference=REQUIRED, prompt="b", seed=4)
    (third,) = await _chain(stub, chain, "a blue whale")
    with rpc_errors():
        await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=first.id))
    after = [await get(stub, r.id) for r in (second, third)]

    # At once: the required one cannot run; the other is released, with nothing to wait for.
    error = after[0].error
    assert status_name(after[0]) == "failed" and after[0].attempts == 0
    assert (error.code, error.reason) == ("dependency_failed", "none_succeeded")
    assert error.message == (
        f"no render before position 2 of chain {chain} has succeeded, and the reference is required"
    )
    assert (status_name(after[1]), after[1].waiting_on) == ("queued", "")

    await start_worker()
    done = await finished(stub, third.id)
    plain = await finished(stub, (await submit(stub, prompt="a blue whale", seed=4)).id)
    assert status_name(done) == "succeeded"
    assert done.output.sha256 == plain.output.sha256  # like the first render of a chain
    assert (await _messages(stub, third.id, "queued"))[-1] == (
        f"no render before position 3 of chain {chain} has succeeded; it runs without a reference"
    )
    notes = [m for m in await _messages(stub, third.id, "phase") if m]
    assert len(notes) == 1 and notes[0].startswith("going on without the reference: nothing_to_continue")


async def test_with_no_predecessor_ever_made_a_render_runs_without_one_unless_required(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts, database_url: str
) -> None:
    alice, chains = await accounts.user("alice"), [await accounts.chain(), await accounts.chain()]
    for chain in chains:
        await _skip_positions(database_url, alice, chain, 4)
    await start_worker(chain_wait_s=0.2)
    required = await submit(stub, chain_id=chains[0], reference=REQUIRED, prompt="a", seed=4)
    (optional,) = await _chain(stub, chains[1], "orphan")
    assert (required.position, optional.position) == (5, 5)

    done = [await finished(stub, r.id) for r in (required, optional)]

    assert [status_name(r) for r in done] == ["failed", "succeeded"]
    assert (done[0].error.code, done[0].error.reason) == ("dependency_failed", "missing")
    assert f"before position 5 of chain {chains[0]}" in done[0].error.message
    assert "it runs without a reference" in (await _messages(stub, optional.id, "queued"))[-1]


async def test_a_position_never_used_is_skipped_after_the_chain_wait(
    stub: Stub, start_worker: WorkerFactory, accounts: Accounts, database_url: str
) -> None:
    alice, chain = await accounts.user("alice"), await accounts.chain()
    (first,) = await _chain(stub, chain, "first")
    await _skip_positions(database_url, alice, chain)  # position 2
    (third,) = await _chain(stub, chain, "third")
    assert third.position == 3
    await start_worker(chain_wait_s=0.3)

    done = await finished(stub, third.id)

    assert status_name(done) == "succeeded"
    notes = await _messages(stub, third.id, "queued")
    assert any(first.id in note for note in notes), notes


async def test_a_batch_can_be_a_chain(stub: Stub, start_worker: WorkerFactory, accounts: Accounts) -> None:
    chain = await accounts.chain()
    (before,) = await _chain(stub, chain, "before the batch")
    items: list[Any] = [spec(chain_id=chain, reference=PREVIOUS) for _ in range(3)]
    batch = await submit_batch(stub, items)
    assert [r.position for r in batch.renders] == [2, 3, 4]  # in item order, after what was there
    assert [r.waiting_on for r in batch.renders] == [before.id, batch.renders[0].id, batch.renders[1].id]
    assert batch.counts.queued == 3
    await start_worker()
    done = [await finished(stub, r.id) for r in batch.renders]
    assert [status_name(r) for r in done] == ["succeeded"] * 3
    with rpc_errors():
        after = await stub.GetBatch(pb.GetBatchRequest(user_id=await user_id(stub), batch_id=batch.id))
    assert after.counts.succeeded == 3
