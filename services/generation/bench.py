"""A quick measurement of the queue (a tool, not a test): `python -m services.generation.bench`.

Against DATABASE_URL's server it makes a scratch database, runs a generation server in process
and worker processes beside it, and prints:
- jobs per second through the queue (procedural backend, no step latency) with 1 and 2 worker
  processes;
- the delay from a worker writing a progress event to a Watch client receiving it (p50, p95).
"""

from __future__ import annotations

import asyncio
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

from services.generation.config import Settings
from services.generation.server import running
from shared.grpc_client import create_channel
from shared.settings import ConfigError, Env

# The async stub type exists only in the .pyi stubs.
Stub: TypeAlias = "pb_grpc.GenerationServiceAsyncStub"
_SPEC = pb.RenderSpec(
    kind=pb.RENDER_KIND_IMAGE, prompt="bench", params=pb.RenderParams(width=64, height=64, steps=4)
)


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


def spawn_workers(count: int, url: str, artifacts: Path, **env: str) -> list[subprocess.Popen[bytes]]:
    environ = {
        **os.environ,
        "DATABASE_URL": url,
        "RENDERFLOW_ARTIFACT_DIR": str(artifacts),
        "RENDERFLOW_RUN_DIR": str(artifacts.parent),
        "RENDERFLOW_LOG_LEVEL": "WARNING",
        **env,
    }
    return [
        subprocess.Popen([sys.executable, "-m", "services.generation.worker"], env=environ)
        for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


async def run_batches(stub: Stub, total: int) -> float:
    """Submits `total` renders in batches of 64 and returns the seconds until all have ended."""
    started = time.perf_counter()
    batches = []
    for offset in range(0, total, 64):
        count = min(64, total - offset)
        batch = await stub.SubmitBatch(pb.SubmitBatchRequest(user_id="bench", renders=[_SPEC] * count))
        batches.append(batch.id)

    async def drain(batch_id: str) -> None:
        async for _ in stub.WatchBatch(pb.WatchBatchRequest(user_id="bench", batch_id=batch_id)):
            pass

    await asyncio.gather(*(drain(b) for b in batches))
    return time.perf_counter() - started


async def throughput(url: str, workdir: Path, workers: int, total: int) -> float:
    async with scratch_database(url) as db:
        settings = Settings(listen="127.0.0.1:0", database_url=db, artifact_dir=workdir / "artifacts")
        async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            processes = spawn_workers(workers, db, settings.artifact_dir)
            try:
                await run_batches(stub, 8 * workers)  # warm-up: every worker is up
                return total / await run_batches(stub, total)
            finally:
                stop(processes)


async def progress_delays(url: str, workdir: Path, renders: int) -> list[float]:
    """Milliseconds from each progress event's insert to its arrival at a Watch client."""
    async with scratch_database(url) as db:
        settings = Settings(listen="127.0.0.1:0", database_url=db, artifact_dir=workdir / "artifacts")
        async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            processes = spawn_workers(
                1,
                db,
                settings.artifact_dir,
                RENDERFLOW_PROCEDURAL_STEP_MS="50",
                RENDERFLOW_PROGRESS_INTERVAL_S="0",
                RENDERFLOW_WORKER_CONCURRENCY=str(renders),
            )
            delays: list[float] = []

            async def watch(render_id: str) -> None:
                async for event in stub.Watch(pb.WatchRequest(user_id="bench", render_id=render_id)):
                    if event.type == "progress":
                        at = event.at.ToDatetime(tzinfo=UTC)
                        delays.append((datetime.now(UTC) - at).total_seconds() * 1000)

            try:
                await run_batches(stub, 2)  # warm-up
                spec = pb.RenderSpec()
                spec.CopyFrom(_SPEC)
                spec.params.steps = 20
                batch = await stub.SubmitBatch(
                    pb.SubmitBatchRequest(user_id="bench", renders=[spec] * renders)
                )
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
            rate = await throughput(url, workdir, workers, total=512)
            print(f"throughput, {workers} worker process(es) x 4 slots, 0 ms/step: {rate:.0f} jobs/s")
        delays = sorted(await progress_delays(url, workdir, renders=8))
        p50 = statistics.median(delays)
        p95 = delays[int(len(delays) * 0.95)]
        print(f"progress event -> Watch client: p50 {p50:.1f} ms, p95 {p95:.1f} ms ({len(delays)} events)")


if __name__ == "__main__":
    asyncio.run(main())
