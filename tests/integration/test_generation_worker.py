"""Workers as the product runs them: real processes killed mid-render, two processes sharing a
queue, SIGTERM hand-back, poll-only mode, and failures classified and retried."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
from collections import Counter
from pathlib import Path

import psycopg
from PIL import Image
from renderflow.v1 import generation_pb2 as pb

from services.generation.artifacts import LocalArtifactStore, StoredArtifact
from services.generation.backends import (
    Artifact,
    GenerationInput,
    PermanentBackendError,
    ProgressCallback,
    TransientBackendError,
)
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    ProcessFactory,
    Stub,
    WorkerFactory,
    events,
    finished,
    get,
    spec,
    status_name,
    submit,
    submit_batch,
    user_id,
)


async def _first(stub: Stub, render_id: str, event_type: str, phase: str = "") -> pb.RenderEvent:
    with rpc_errors():
        async for event in stub.Watch(pb.WatchRequest(user_id=await user_id(stub), render_id=render_id)):
            if event.type == event_type and (not phase or event.phase == phase):
                return event
    raise AssertionError(f"no {event_type} {phase} event")


async def _exited(process: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)


async def test_a_killed_worker_process_loses_nothing(
    stub: Stub, spawn_worker: ProcessFactory, artifact_dir: Path
) -> None:
    doomed = spawn_worker(RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS="100")
    render = await submit(stub, steps=20)  # two seconds of work
    await asyncio.wait_for(_first(stub, render.id, "progress"), 20)
    doomed.send_signal(signal.SIGKILL)
    await _exited(doomed, 5)
    spawn_worker(RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS="100")

    done = await finished(stub, render.id, timeout=30)

    assert status_name(done) == "succeeded" and done.attempts == 2
    log = await events(stub, render.id)
    assert Counter(e.type for e in log)["succeeded"] == 1
    assert [e.type for e in log if e.type in ("queued", "started")] == [
        "queued",
        "started",
        "queued",
        "started",
    ]
    assert "stopped renewing its lease" in [e for e in log if e.type == "queued"][1].message
    assert [p.name for p in artifact_dir.rglob("*") if p.is_file()] == [render.id]


async def test_two_worker_processes_run_200_renders_once_each(
    stub: Stub, spawn_worker: ProcessFactory
) -> None:
    spawn_worker()
    spawn_worker()
    batches = [(await submit_batch(stub, [spec(steps=2) for _ in range(50)])).id for _ in range(4)]
    with rpc_errors():
        logs = await asyncio.wait_for(
            asyncio.gather(*(_watch_batch(stub, batch_id) for batch_id in batches)), 60
        )
    seen = [event for log in logs for event in log]
    terminal = Counter(e.render_id for e in seen if e.type in ("succeeded", "failed", "cancelled"))
    assert len(terminal) == 200 and set(terminal.values()) == {1}
    assert {e.type for e in seen if e.type in ("failed", "cancelled")} == set()
    starts = [e for e in seen if e.type == "started"]
    assert len(starts) == 200  # no render ran twice
    assert {e.message.rsplit(" ", 1)[-1] for e in starts} == {"process-0", "process-1"}


async def test_sigterm_hands_unfinished_renders_back(stub: Stub, spawn_worker: ProcessFactory) -> None:
    leaving = spawn_worker(RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS="200", RENDERFLOW_WORKER_DRAIN_GRACE_S="0.3")
    render = await submit(stub, steps=50)  # ten seconds of work
    await asyncio.wait_for(_first(stub, render.id, "progress"), 20)
    leaving.send_signal(signal.SIGTERM)
    assert await _exited(leaving, 10) == 0
    back = await get(stub, render.id)
    assert status_name(back) == "queued" and back.queue_position == 0
    spawn_worker(RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS="0")
    done = await finished(stub, render.id, timeout=30)
    # The handed-back attempt was refunded: the render did not come closer to its limit.
    assert status_name(done) == "succeeded" and done.attempts == 1


async def test_poll_only_worker_still_runs_renders(stub: Stub, start_worker: WorkerFactory) -> None:
    await start_worker(db_poll_only=True, poll_interval_s=0.2)
    render = await submit(stub)
    assert status_name(await finished(stub, render.id)) == "succeeded"


class FlakyBackend:
    """Fails with the given errors, in turn, then paints a one-pixel-grey PNG."""

    name = "procedural"

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        self.calls += 1
        await on_progress(1, 1)
        if self.errors:
            raise self.errors.pop(0)
        out = io.BytesIO()
        Image.new("RGB", (job.width, job.height), "grey").save(out, "PNG")
        return Artifact(out.getvalue(), "image/png", job.width, job.height)


async def test_transient_failures_are_retried_then_fail_with_the_reason(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    overloaded = [TransientBackendError("provider overloaded", "overloaded") for _ in range(3)]
    backend = FlakyBackend(*overloaded)
    await start_worker(backends={"procedural": backend}, max_attempts=3)
    render = await submit(stub)

    done = await finished(stub, render.id)

    assert status_name(done) == "failed" and done.attempts == 3 and backend.calls == 3
    assert (done.error.code, done.error.reason) == ("generation_failed", "overloaded")
    assert "after 3 attempts" in done.error.message and done.error.retryable
    retries = [e.message for e in await events(stub, render.id) if e.type == "queued"][1:]
    assert len(retries) == 2 and all("overloaded" in m for m in retries)


async def test_a_transient_failure_then_success(stub: Stub, start_worker: WorkerFactory) -> None:
    backend = FlakyBackend(TransientBackendError("connection reset", "connection_failed"))
    await start_worker(backends={"procedural": backend})
    done = await finished(stub, (await submit(stub)).id)
    assert status_name(done) == "succeeded" and done.attempts == 2 and not done.HasField("error")


async def test_a_permanent_failure_is_not_retried(stub: Stub, start_worker: WorkerFactory) -> None:
    backend = FlakyBackend(PermanentBackendError("prompt refused", "content_policy"))
    await start_worker(backends={"procedural": backend})
    done = await finished(stub, (await submit(stub)).id)
    assert status_name(done) == "failed" and done.attempts == 1 and backend.calls == 1
    assert (done.error.code, done.error.reason, done.error.retryable) == (
        "generation_failed",
        "content_policy",
        False,
    )


async def test_a_cancel_racing_a_retry_still_cancels(stub: Stub, start_worker: WorkerFactory) -> None:
    alice = await user_id(stub)

    class CancelThenFail(FlakyBackend):
        async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
            self.calls += 1
            with rpc_errors():
                await stub.Cancel(pb.CancelRequest(user_id=alice, render_id=job.render_id))
            raise TransientBackendError("provider overloaded", "overloaded")

    backend = CancelThenFail()
    # Poll-only: no NOTIFY stops the task first, so the job is requeued with its cancel pending.
    await start_worker(
        backends={"procedural": backend}, retry_base_s=0.0, db_poll_only=True, poll_interval_s=0.2
    )
    done = await finished(stub, (await submit(stub)).id)
    assert status_name(done) == "cancelled" and backend.calls == 1


async def test_a_worker_whose_job_was_taken_drops_its_work(
    stub: Stub, start_worker: WorkerFactory, database_url: str
) -> None:
    class Blocking(FlakyBackend):
        """The first run blocks until cancelled; later runs paint."""

        def __init__(self) -> None:
            super().__init__()
            self.started = asyncio.Event()
            self.cancelled = False

        async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
            if self.calls == 0:
                self.calls += 1
                self.started.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    self.cancelled = True
                    raise
            return await super().generate(job, on_progress)

    backend = Blocking()
    await start_worker(backends={"procedural": backend})
    render = await submit(stub)
    await asyncio.wait_for(backend.started.wait(), 10)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # As if the rescuer had given the job to another worker.
        await conn.execute("UPDATE generation.jobs SET lease_token = gen_random_uuid()")

    done = await finished(stub, render.id)

    assert backend.cancelled and status_name(done) == "succeeded" and done.attempts == 2
    assert [e.type for e in await events(stub, render.id)].count("succeeded") == 1


async def _watch_batch(stub: Stub, batch_id: str) -> list[pb.RenderEvent]:
    call = stub.WatchBatch(pb.WatchBatchRequest(user_id=await user_id(stub), batch_id=batch_id))
    return [event async for event in call]


class GatedArtifacts(LocalArtifactStore):
    """Artifacts on disk whose writes wait for the test to open the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()

    async def put(
        self, render_id: str, data: bytes | Path, content_type: str | None = None
    ) -> StoredArtifact:
        await self.gate.wait()
        return await super().put(render_id, data, content_type)


async def test_a_long_store_phase_is_announced_while_it_lasts(
    stub: Stub, start_worker: WorkerFactory, artifact_dir: Path
) -> None:
    artifacts = GatedArtifacts(artifact_dir)
    await start_worker(artifacts=artifacts, progress_interval_s=0.1)
    render = await submit(stub)
    storing = await asyncio.wait_for(_first(stub, render.id, "phase", "store"), 10)
    assert status_name(await get(stub, render.id)) == "running"  # announced before the render ended
    artifacts.gate.set()
    done = await finished(stub, render.id)
    assert status_name(done) == "succeeded"
    log = [(e.type, e.phase) for e in await events(stub, render.id)]
    assert log.count(("phase", "store")) == 1 and log.index(("phase", "store")) == storing.seq - 1
    assert log[-1] == ("succeeded", "")


async def test_a_short_store_phase_is_reported_with_the_end_not_dropped(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    await start_worker(progress_interval_s=5.0)
    render = await submit(stub)
    done = await finished(stub, render.id)
    log = [(e.type, e.phase) for e in await events(stub, render.id)]
    assert status_name(done) == "succeeded"
    assert log[-2:] == [("phase", "store"), ("succeeded", "")]
