"""Chains: a render whose reference is the previous render of its chain waits for it (showing what
it waits on), then runs on its output (the last frame of a video). A render that failed or was
cancelled is skipped: its successors continue from the nearest earlier render that succeeded. With
none to continue from, a chain render runs without a reference, or fails with `dependency_failed`
when its reference is required. Predecessors submitted late are waited for, a position never used
is skipped after a while."""

from __future__ import annotations

import asyncio
import io
import itertools
from pathlib import Path
from typing import Any

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
    Stub,
    WorkerFactory,
    events,
    finished,
    output,
    spec,
    status_name,
    submit,
)

PREVIOUS = pb.Reference(chain_previous=True)
REQUIRED = pb.Reference(chain_previous=True, required=True)


async def _chain(stub: Stub, *prompts: str, chain_id: str = "chain-1", start: int = 1) -> list[pb.Render]:
    return [
        await submit(stub, chain_id=chain_id, position=start + i, reference=PREVIOUS, prompt=prompt, seed=4)
        for i, prompt in enumerate(prompts)
    ]


async def _video(stub: Stub, position: int, chain_id: str = "chain-1") -> pb.Render:
    """A short 96 x 64 video at `position` of the chain, continuing from the render before it."""
    video = spec(
        kind=pb.RENDER_KIND_VIDEO,
        chain_id=chain_id,
        position=position,
        reference=PREVIOUS,
        width=96,
        height=64,
    )
    video.params.duration_s, video.params.fps = 1.0, 6
    with rpc_errors():
        return await stub.Submit(pb.SubmitRequest(user_id="alice", render=video))


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
    assert notes == [f"reference: the output of {second.id}, position 2 of the chain"]


async def test_a_render_after_a_video_continues_from_its_last_frame(
    stub: Stub, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    backend = Recording()
    await start_worker(backends={"procedural": backend})
    first, second = await _video(stub, 1), await _video(stub, 2)
    (image,) = await _chain(stub, "a blue whale", start=3)

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
    stub: Stub, start_worker: WorkerFactory
) -> None:
    first, second, third, fourth = await _chain(stub, "fine", "doomed", "a blue whale", "a red fox")
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
    stub: Stub, start_worker: WorkerFactory
) -> None:
    first = await submit(stub, chain_id="chain-1", position=1, prompt="a", seed=4)
    second = await submit(stub, chain_id="chain-1", position=2, reference=REQUIRED, prompt="b", seed=4)
    (third,) = await _chain(stub, "a blue whale", start=3)
    with rpc_errors():
        await stub.Cancel(pb.CancelRequest(user_id="alice", render_id=first.id))
        after = [
            await stub.GetRender(pb.GetRenderRequest(user_id="alice", render_id=r.id))
            for r in (second, third)
        ]

    # At once: the required one cannot run; the other is released, with nothing to wait for.
    error = after[0].error
    assert status_name(after[0]) == "failed" and after[0].attempts == 0
    assert (error.code, error.reason) == ("dependency_failed", "none_succeeded")
    assert error.message == (
        "no render before position 2 of chain chain-1 has succeeded, and the reference is required"
    )
    assert (status_name(after[1]), after[1].waiting_on) == ("queued", "")

    await start_worker()
    done = await finished(stub, third.id)
    plain = await finished(stub, (await submit(stub, prompt="a blue whale", seed=4)).id)
    assert status_name(done) == "succeeded"
    assert done.output.sha256 == plain.output.sha256  # like the first render of a chain
    assert (await _messages(stub, third.id, "queued"))[-1] == (
        "no render before position 3 of chain chain-1 has succeeded; it runs without a reference"
    )
    notes = [m for m in await _messages(stub, third.id, "phase") if m]
    assert len(notes) == 1 and notes[0].startswith("going on without the reference: nothing_to_continue")


async def test_a_predecessor_submitted_late_is_waited_for(stub: Stub, start_worker: WorkerFactory) -> None:
    (second,) = await _chain(stub, "second", start=2)
    assert second.waiting_on == "" and status_name(second) == "queued"
    (first,) = await _chain(stub, "first")
    await start_worker()

    done = [await finished(stub, r.id) for r in (first, second)]

    assert [status_name(r) for r in done] == ["succeeded", "succeeded"]
    assert done[1].started_at.ToDatetime() >= done[0].finished_at.ToDatetime()


async def test_with_no_predecessor_ever_submitted_a_render_runs_without_one_unless_required(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    await start_worker(chain_wait_s=0.2)
    required = await submit(stub, chain_id="chain-1", position=5, reference=REQUIRED, prompt="a", seed=4)
    (optional,) = await _chain(stub, "orphan", chain_id="chain-2", start=5)

    done = [await finished(stub, r.id) for r in (required, optional)]

    assert [status_name(r) for r in done] == ["failed", "succeeded"]
    assert (done[0].error.code, done[0].error.reason) == ("dependency_failed", "missing")
    assert "before position 5 of chain chain-1" in done[0].error.message
    assert "it runs without a reference" in (await _messages(stub, optional.id, "queued"))[-1]


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
