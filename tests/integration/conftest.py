"""Fixtures of the generation tests: a real server on port 0, servers with changed settings,
in-process workers and worker processes. (Modules testing another service define their own `stub`,
which takes precedence in them.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from renderflow.v1 import generation_pb2_grpc as pb_grpc

from services.generation.config import Settings, WorkerSettings
from services.generation.server import running
from services.generation.worker import Worker, running_worker
from shared.grpc_client import create_channel
from tests.support.generation import ProcessFactory, ServerFactory, Stub, WorkerFactory

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def worker_settings(database_url: str, artifact_dir: Path) -> WorkerSettings:
    """Fast settings for in-process workers: short leases, quick rescues and retries."""
    return WorkerSettings(
        database_url=database_url,
        artifact_dir=artifact_dir,
        imagefetch_addr="127.0.0.1:1",
        worker_id="test-worker",
        lease_s=2.0,
        heartbeat_s=0.5,
        rescue_interval_s=0.5,
        retry_base_s=0.05,
        retry_max_s=0.2,
        poll_interval_s=1.0,
        shutdown_grace_s=2.0,
        progress_interval_s=0.0,
        image_fetch_outage_s=0.5,
    )


@pytest.fixture
async def stub(database_url: str, artifact_dir: Path) -> AsyncIterator[Stub]:
    """A client of a real generation server on port 0."""
    settings = Settings(
        listen="127.0.0.1:0", database_url=database_url, artifact_dir=artifact_dir, drain_grace_s=0.5
    )
    async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture
async def start_server(database_url: str, artifact_dir: Path) -> AsyncIterator[ServerFactory]:
    """Starts generation servers with changed settings (`start_server(stall_after_s=1)`) and
    returns a client of each; stops them after."""
    async with AsyncExitStack() as stack:

        async def start(**changes: Any) -> Stub:
            settings = Settings(
                listen="127.0.0.1:0", database_url=database_url, artifact_dir=artifact_dir, drain_grace_s=0.5
            )
            port = await stack.enter_async_context(running(replace(settings, **changes)))
            channel = await stack.enter_async_context(create_channel(f"127.0.0.1:{port}"))
            return pb_grpc.GenerationServiceStub(channel)

        yield start


@pytest.fixture
async def start_worker(worker_settings: WorkerSettings) -> AsyncIterator[WorkerFactory]:
    """Starts in-process workers (`start_worker(backends=..., **settings)`); stops them after."""
    async with AsyncExitStack() as stack:

        async def start(backends: Any = None, **changes: Any) -> Worker:
            settings = replace(worker_settings, **changes)
            return await stack.enter_async_context(running_worker(settings, backends=backends))

        yield start


@pytest.fixture
def spawn_worker(database_url: str, artifact_dir: Path, tmp_path: Path) -> Iterator[ProcessFactory]:
    """Starts `python -m services.generation.worker` processes with short leases; kills them after."""
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(**env: str) -> subprocess.Popen[bytes]:
        index = len(processes)
        environ = {
            **os.environ,
            "DATABASE_URL": database_url,
            "RENDERFLOW_ARTIFACT_DIR": str(artifact_dir),
            "RENDERFLOW_RUN_DIR": str(tmp_path / "run"),
            "RENDERFLOW_WORKER_ID": f"process-{index}",
            "RENDERFLOW_WORKER_LEASE_S": "2",
            "RENDERFLOW_WORKER_HEARTBEAT_S": "0.5",
            "RENDERFLOW_WORKER_RESCUE_S": "0.5",
            "RENDERFLOW_WORKER_POLL_S": "1",
            "RENDERFLOW_LOG_LEVEL": "WARNING",
            **env,
        }
        log = (tmp_path / f"worker-{index}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.generation.worker"], cwd=REPO, env=environ, stderr=log
        )
        log.close()
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
