"""A measurement of the queue (a tool, not a test): `python -m services.generation.bench`.

Against DATABASE_URL's server it makes a scratch database per figure, runs a generation server in
process and worker processes beside it, and prints:
- jobs per second through the queue with a no-op backend and artifact store (so that claim,
  events, finish and the Watch fan-out are what is measured), with 1 and 2 worker processes of
  4 slots each;
- the makespan of a batch of 8 renders of 2 s each (procedural backend, 20 steps of 100 ms) with
  2 worker processes of 4 slots, against 8 x 2 s one after another;
- the delay from a worker writing a progress event to a Watch client receiving it (p50, p99).

`python -m services.generation.bench worker` is the no-op worker process it starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeAlias

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from renderflow.v1 import generation_pb2 as pb
from renderflow.v1 import generation_pb2_grpc as pb_grpc

from services.generation.artifacts import StoredArtifact
from services.generation.backends import Artifact, GenerationInput, ProgressCallback
from services.generation.config import Settings, WorkerSettings
from services.generation.server import running
from services.generation.worker import running_worker
from shared.grpc_client import create_channel
from shared.lifecycle import wait_for_shutdown_signal
from shared.logs import setup_logging
from shared.service_auth import new_service_token
from shared.settings import ConfigError, Env

# The async stub type exists only in the .pyi stubs.
Stub: TypeAlias = "pb_grpc.GenerationServiceAsyncStub"
_SPEC = pb.RenderSpec(
    kind=pb.RENDER_KIND_IMAGE, prompt="bench", params=pb.RenderParams(width=64, height=64, steps=4)
)
_USER = "bench"


class NoOpBackend:
    """Returns the same few bytes at once, with one progress report."""

    name = "procedural"

    async def generate(self, job: GenerationInput, on_progress: ProgressCallback) -> Artifact:
        await on_progress(1, 1)
        return Artifact(b"bench", "image/png", job.width, job.height)


class NullArtifacts:
    """Keeps nothing: the queue's throughput, not the disk's, is measured."""

    async def put(self, render_id: str, data: bytes) -> StoredArtifact:
        return StoredArtifact(len(data), hashlib.sha256(data).hexdigest())

    async def size(self, render_id: str) -> int:
        raise NotImplementedError

    def read(self, render_id: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def get(self, render_id: str) -> bytes:
        raise NotImplementedError

    def path(self, render_id: str) -> Path:
        raise NotImplementedError


@asynccontextmanager
async def scratch_database(url: str) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(url, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@asynccontextmanager
async def queue_under_test(url: str, workdir: Path) -> AsyncIterator[tuple[str, Stub]]:
    """A scratch database and a server on it (no quota): its URL and a client."""
    async with scratch_database(url) as db:
        settings = Settings(
            listen="127.0.0.1:0", database_url=db, artifact_dir=workdir / "artifacts", max_active_renders=0
        )
        async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
            yield db, pb_grpc.GenerationServiceStub(channel)


def spawn_workers(
    count: int, url: str, artifacts: Path, *args: str, **env: str
) -> list[subprocess.Popen[bytes]]:
    environ = {
        # The workers call no service here, but their settings insist on a token.
        "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
        **os.environ,
        "DATABASE_URL": url,
        "RENDERFLOW_ARTIFACT_DIR": str(artifacts),
        "RENDERFLOW_RUN_DIR": str(artifacts.parent),
        "RENDERFLOW_LOG_LEVEL": "WARNING",
        **env,
    }
    module = "services.generation.bench" if args else "services.generation.worker"
    return [subprocess.Popen([sys.executable, "-m", module, *args], env=environ) for _ in range(count)]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


async def run_batches(stub: Stub, total: int, spec: pb.RenderSpec = _SPEC) -> float:
    """Submits `total` renders in batches of 64 and returns the seconds until all have ended."""
    started = time.perf_counter()
    batches = []
    for offset in range(0, total, 64):
        count = min(64, total - offset)
        batch = await stub.SubmitBatch(pb.SubmitBatchRequest(user_id=_USER, renders=[spec] * count))
        batches.append(batch.id)

    async def drain(batch_id: str) -> None:
        async for _ in stub.WatchBatch(pb.WatchBatchRequest(user_id=_USER, batch_id=batch_id)):
            pass

    await asyncio.gather(*(drain(b) for b in batches))
    return time.perf_counter() - started


async def throughput(url: str, workdir: Path, workers: int, total: int) -> float:
    """No-op jobs per second through the queue."""
    async with queue_under_test(url, workdir) as (db, stub):
        processes = spawn_workers(workers, db, workdir / "artifacts", "worker")
        try:
            await run_batches(stub, 8 * workers)  # warm-up: every worker is up
            return total / await run_batches(stub, total)
        finally:
            stop(processes)


async def batch_makespan(url: str, workdir: Path) -> float:
    """Seconds from submitting a batch of 8 renders of 2 s each to the last one's end."""
    async with queue_under_test(url, workdir) as (db, stub):
        processes = spawn_workers(2, db, workdir / "artifacts", RENDERFLOW_PROCEDURAL_STEP_MS="100")
        try:
            await run_batches(stub, 8)  # warm-up (4 steps: 0.4 s each)
            spec = pb.RenderSpec()
            spec.CopyFrom(_SPEC)
            spec.params.steps = 20
            return await run_batches(stub, 8, spec)
        finally:
            stop(processes)


async def progress_delays(url: str, workdir: Path, renders: int) -> list[float]:
    """Milliseconds from each progress event's insert to its arrival at a Watch client."""
    async with queue_under_test(url, workdir) as (db, stub):
        processes = spawn_workers(
            1,
            db,
            workdir / "artifacts",
            RENDERFLOW_PROCEDURAL_STEP_MS="25",
            RENDERFLOW_PROGRESS_INTERVAL_S="0",
            RENDERFLOW_WORKER_CONCURRENCY=str(renders),
        )
        delays: list[float] = []

        async def watch(render_id: str) -> None:
            async for event in stub.Watch(pb.WatchRequest(user_id=_USER, render_id=render_id)):
                if event.type == "progress":
                    at = event.at.ToDatetime(tzinfo=UTC)
                    delays.append((datetime.now(UTC) - at).total_seconds() * 1000)

        try:
            await run_batches(stub, 2)  # warm-up
            spec = pb.RenderSpec()
            spec.CopyFrom(_SPEC)
            spec.params.steps = 50
            batch = await stub.SubmitBatch(pb.SubmitBatchRequest(user_id=_USER, renders=[spec] * renders))
            await asyncio.gather(*(watch(r.id) for r in batch.renders))
        finally:
            stop(processes)
        return delays


async def main() -> None:
    url = Env().optional("DATABASE_URL")
    if url is None:
        raise ConfigError("DATABASE_URL is required (a server where scratch databases may be made)")
    conninfo_to_dict(url)  # fail early on a malformed URL
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for workers in (1, 2):
            rate = await throughput(url, workdir, workers, total=1024)
            print(f"throughput, no-op backend, {workers} worker process(es) x 4 slots: {rate:.0f} jobs/s")
        makespan = await batch_makespan(url, workdir)
        print(
            f"batch of 8 renders x 2 s, 2 worker processes x 4 slots: makespan {makespan:.2f} s"
            f" (one after another: 16 s; {16 / makespan:.1f}x faster)"
        )
        delays = sorted(await progress_delays(url, workdir, renders=8))
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, round(len(delays) * 0.99))]
        print(f"progress event -> Watch client: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(delays)} events)")


async def _noop_worker() -> None:
    settings = WorkerSettings.from_env(Env())
    async with running_worker(settings, backends={"procedural": NoOpBackend()}, artifacts=NullArtifacts()):
        await wait_for_shutdown_signal()


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        setup_logging("generation-bench-worker", "WARNING")
        asyncio.run(_noop_worker())
    else:
        asyncio.run(main())
