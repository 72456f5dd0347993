"""Fixtures of the integration tests.

- Generation: a real server on port 0 (`stub`), servers with changed settings, in-process workers
  and worker processes. (Modules testing another service define their own `stub`, which takes
  precedence in them.) Generation resolves projects, chains and rules through a real metadata
  server on the same database (`metadata_addr`), whose users, made on first mention by name with
  a project ready, are the test's `accounts` (tests/support/generation.py).
- Gateway: the whole stack in this process (`stack`), shaped by `gateway_settings` and
  `stack_worker` (none by default), which modules override.
- Observability: the `observed` stack, whose spans the module's `recorder` keeps; the worker's
  backends in `worker_backends` (None: the configured ones).
- A database shared by the tests of one module; a Redis of our own (`redis_url`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from renderflow.v1 import generation_pb2_grpc as pb_grpc
from renderflow.v1.metadata_pb2_grpc import MetadataServiceStub

from gateway.config import Settings as GatewaySettings
from services.generation.backends import Backend
from services.generation.config import Settings, WorkerSettings
from services.generation.server import running
from services.generation.worker import Worker, running_worker
from services.metadata.config import Settings as MetadataSettings
from services.metadata.server import running as metadata_running
from shared.grpc_client import create_channel
from shared.metrics import serve_metrics
from shared.service_auth import new_service_token
from tests.support.gateway_stack import LiveStack, StartWorker, running_stack
from tests.support.generation import (
    Accounts,
    ProcessFactory,
    ServerFactory,
    Stub,
    WorkerFactory,
    serving,
)
from tests.support.observed_stack import ObservedStack, Recorder, observed_stack, recording
from tests.support.redis_server import serving_redis

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
async def metadata_addr(database_url: str) -> AsyncIterator[str]:
    """The address of a real metadata server on port 0, on the test's database: the one generation
    resolves projects, chains and rules through."""
    settings = MetadataSettings(
        listen="127.0.0.1:0", database_url=database_url, change_poll_s=0.2, drain_grace_s=0.5
    )
    async with metadata_running(settings) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def accounts(metadata_addr: str) -> AsyncIterator[Accounts]:
    """The test's metadata users, made on first mention (`await accounts.user("alice")`: the id),
    each with project `art`; their chains and rules."""
    async with create_channel(metadata_addr) as channel:
        yield Accounts(MetadataServiceStub(channel))


def _generation_settings(database_url: str, artifact_dir: Path, metadata_addr: str) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        artifact_dir=artifact_dir,
        metadata_addr=metadata_addr,
        drain_grace_s=0.5,
    )


@pytest.fixture
async def stub(
    database_url: str, artifact_dir: Path, metadata_addr: str, accounts: Accounts
) -> AsyncIterator[Stub]:
    """A client of a real generation server on port 0, whose users are `accounts`'."""
    settings = _generation_settings(database_url, artifact_dir, metadata_addr)
    async with running(settings) as port, create_channel(f"127.0.0.1:{port}") as channel:
        yield serving(pb_grpc.GenerationServiceStub(channel), accounts)


@pytest.fixture
async def start_server(
    database_url: str, artifact_dir: Path, metadata_addr: str, accounts: Accounts
) -> AsyncIterator[ServerFactory]:
    """Starts generation servers with changed settings (`start_server(stall_after_s=1)`) and
    returns a client of each, whose users are `accounts`'; stops them after."""
    async with AsyncExitStack() as stack:

        async def start(**changes: Any) -> Stub:
            settings = _generation_settings(database_url, artifact_dir, metadata_addr)
            port = await stack.enter_async_context(running(replace(settings, **changes)))
            channel = await stack.enter_async_context(create_channel(f"127.0.0.1:{port}"))
            return serving(pb_grpc.GenerationServiceStub(channel), accounts)

        yield start


@pytest.fixture
async def start_worker(worker_settings: WorkerSettings) -> AsyncIterator[WorkerFactory]:
    """Starts in-process workers (`start_worker(backends=..., artifacts=..., **settings)`); stops
    them after."""
    async with AsyncExitStack() as stack:

        async def start(backends: Any = None, artifacts: Any = None, **changes: Any) -> Worker:
            settings = replace(worker_settings, **changes)
            return await stack.enter_async_context(
                running_worker(settings, backends=backends, artifacts=artifacts)
            )

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
            "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
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


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    """How the gateway of `stack` runs (its port and addresses are replaced)."""
    return GatewaySettings(sse_heartbeat_s=0.2, shutdown_grace_s=1.0)


@pytest.fixture
def worker_step_ms() -> float:
    """Latency of each generation step of the procedural backend."""
    return 1.0


@pytest.fixture
def worker_concurrency() -> int:
    """Renders the worker runs at once."""
    return 4


@pytest.fixture
def stack_worker() -> StartWorker | None:
    """What runs the renders of `stack`: nothing here; modules that render override this fixture."""
    return None


@pytest.fixture
async def stack(
    database_url: str, tmp_path: Path, gateway_settings: GatewaySettings, stack_worker: StartWorker | None
) -> AsyncIterator[LiveStack]:
    """Metadata, generation, `stack_worker` and the gateway in this process, on one database."""
    async with running_stack(database_url, tmp_path, gateway_settings, stack_worker) as live:
        yield live


@pytest.fixture(scope="module")
def module_database_url(pg_server_url: str) -> Iterator[str]:
    """A new, empty database shared by the tests of one module, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = {key: str(value) for key, value in conninfo_to_dict(pg_server_url).items() if value is not None}
    params["dbname"] = name
    yield make_conninfo(**params)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    """Spans of everything this process does while the module's tests run, down to SQL."""
    with recording() as spans:
        yield spans


@pytest.fixture
def worker_backends() -> Mapping[str, Backend] | None:
    """The `observed` worker's backends (None: the configured ones)."""
    return None


@pytest.fixture
async def observed(
    database_url: str, tmp_path: Path, recorder: Recorder, worker_backends: Mapping[str, Backend] | None
) -> AsyncIterator[ObservedStack]:
    async with observed_stack(database_url, tmp_path, recorder, worker_backends) as stack:
        yield stack


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of our own on a free port for the session, or a skip saying why not."""
    with serving_redis() as url:
        yield url


@pytest.fixture
async def service_metrics_url() -> AsyncIterator[str]:
    """`/metrics` on a port of its own, as the gRPC services and the workers serve it."""
    server = serve_metrics("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.stop()
