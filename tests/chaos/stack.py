"""The whole stack as real processes, under the chaos suite's control: a PostgreSQL it can stop and
start on the same port, the services and workers under a `Supervisor` (so every child's pid is
known), and a reference-image origin in this process whose every fetch can be made to hang."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from services.metadata.admin import ensure_dev_user
from shared.service_auth import new_service_token
from shared.settings import Addresses, Env
from tests.conftest import free_port
from tests.support.origin import Origin
from tools.cli.main import gateway_url, renderflow_stages
from tools.cli.supervisor import ChildEvent, GrpcHealth, HttpHealth, Supervisor
from tools.embedded_pg.server import EmbeddedPostgres

DEV_KEY = "rf_chaos_development_key_0123456789abcdef"
GRPC_SERVICES = ("metadata", "imagefetch", "generation")


@dataclass(frozen=True)
class StackConfig:
    """How the stack under test runs. The chaos defaults shorten leases and fetch deadlines so a
    run stays short; `product_defaults` leaves every setting but the step latency as shipped."""

    workers: int = 2
    worker_concurrency: int = 4
    step_ms: float = 100.0
    lease_s: float | None = 6.0
    heartbeat_s: float | None = 2.0
    rescue_s: float | None = 1.0
    fetch_timeout_s: float = 3.0
    pg_fast: bool = True
    """fsync off: a chaos run measures recovery, not disk flushes."""
    log_level: str = "WARNING"
    pg_settings: Mapping[str, str] = field(default_factory=dict)
    """PostgreSQL server settings beyond the stack's (a benchmark's pg_stat_statements)."""
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def product_defaults(cls, step_ms: float, **changes: Any) -> StackConfig:
        """The shipped settings (leases, deadlines, durable PostgreSQL), with this step latency and
        without the per-key submit rate limit, active-render quota and open-stream cap (a benchmark
        is one key sending, and following its renders, as fast as it can)."""
        no_per_key_limits = {
            "RENDERFLOW_GATEWAY_RATE_LIMIT_PER_S": "0",
            "RENDERFLOW_GATEWAY_RATE_LIMIT_BURST": "0",
            "RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS": "0",
            "RENDERFLOW_GATEWAY_MAX_STREAMS_PER_KEY": "1000000",
        }
        return cls(
            step_ms=step_ms, lease_s=None, heartbeat_s=None, rescue_s=None, fetch_timeout_s=5.0,
            pg_fast=False, extra_env={**no_per_key_limits, **changes.pop("extra_env", {})}, **changes,
        )  # fmt: skip

    def environment(self) -> dict[str, str]:
        """The RENDERFLOW_* settings of this configuration (ports are added by the stack)."""
        env = {
            "RENDERFLOW_LOCAL_WORKERS": str(self.workers),
            "RENDERFLOW_WORKER_CONCURRENCY": str(self.worker_concurrency),
            "RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS": f"{self.step_ms:g}",
            "RENDERFLOW_WORKER_IMAGEFETCH_TIMEOUT_S": f"{self.fetch_timeout_s:g}",
            "RENDERFLOW_IMAGEFETCH_DEADLINE_S": f"{self.fetch_timeout_s:g}",
            "RENDERFLOW_IMAGEFETCH_ALLOW": "127.0.0.1",
            "RENDERFLOW_LOG_LEVEL": self.log_level,
        }
        for name, value in (
            ("RENDERFLOW_WORKER_LEASE_S", self.lease_s),
            ("RENDERFLOW_WORKER_HEARTBEAT_S", self.heartbeat_s),
            ("RENDERFLOW_WORKER_RESCUE_S", self.rescue_s),
        ):
            if value is not None:
                env[name] = f"{value:g}"
        return {**env, **self.extra_env}


class Stack:
    """A running stack; see `running_stack`."""

    def __init__(self, workdir: Path, config: StackConfig) -> None:
        self.workdir = workdir
        self.config = config
        self.run_dir = workdir / "run"
        self.artifact_dir = self.run_dir / "artifacts"
        self.api_key = DEV_KEY
        self.env: dict[str, str] = {
            **config.environment(),
            "RENDERFLOW_RUN_DIR": str(self.run_dir),
            "RENDERFLOW_ARTIFACT_DIR": str(self.artifact_dir),
            "RENDERFLOW_GATEWAY_PORT": str(free_port()),
            "RENDERFLOW_METADATA_ADDR": f"127.0.0.1:{free_port()}",
            "RENDERFLOW_IMAGEFETCH_ADDR": f"127.0.0.1:{free_port()}",
            "RENDERFLOW_GENERATION_ADDR": f"127.0.0.1:{free_port()}",
            "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
            "PYTHONUNBUFFERED": "1",
        }
        self.url = gateway_url(Env(self.env))
        self.postgres = EmbeddedPostgres(
            workdir / "pg", port=free_port(), fast=config.pg_fast, settings=config.pg_settings
        )
        self.database_url = ""
        self.origin = Origin()
        self.child_events: list[ChildEvent] = []
        """Starts, deaths and restarts of the children, in order."""
        self._supervisor: Supervisor | None = None

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "the stack is not started"
        return self._supervisor

    def worker_names(self) -> list[str]:
        return [f"worker-{n}" for n in range(1, self.config.workers + 1)]

    def pid(self, name: str) -> int | None:
        """The pid of child `name` now (None while it is down)."""
        return self.supervisor.pids().get(name)

    def health(self, name: str) -> GrpcHealth | HttpHealth:
        """The probe that tells child `name` serves."""
        addresses = Addresses.from_env(Env(self.env))
        if name == "gateway":
            return HttpHealth(f"{self.url}/healthz")
        return GrpcHealth(getattr(addresses, name))

    async def start(self) -> None:
        await self.origin.start()
        self.origin.gate.set()  # a healthy origin: /gated/* answers at once
        self.database_url = await asyncio.to_thread(self.postgres.start)
        # The key exists before the gateway serves (ensure_dev_user applies the migrations it needs).
        await ensure_dev_user(self.database_url, self.api_key)
        env = {**self.env, "DATABASE_URL": self.database_url}
        stages = renderflow_stages(Env({**os.environ, **env}), python=sys.executable)
        self._supervisor = Supervisor(
            stages, self.run_dir / "logs", env=env, stop_timeout=7.5, notify=self.child_events.append
        )
        await self._supervisor.start()

    async def stop(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.stop()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.postgres.stop)
        await self.origin.close()

    def kill(self, name: str) -> int:
        """SIGKILL child `name` (the supervisor restarts it); returns the pid killed."""
        pid = self.pid(name)
        if pid is None:
            raise RuntimeError(f"{name} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    async def wait_serving(self, name: str, old_pid: int | None, timeout_s: float = 30.0) -> float:
        """Waits until `name` runs under a pid other than `old_pid` and passes its health check;
        returns the monotonic time it did."""
        probe = self.health(name) if name in (*GRPC_SERVICES, "gateway") else None
        async with asyncio.timeout(timeout_s):
            while True:
                pid = self.pid(name)
                if pid is not None and pid != old_pid and (probe is None or await probe.probe()):
                    return time.monotonic()
                await asyncio.sleep(0.05)

    async def stop_postgres(self) -> None:
        """Fast shutdown of PostgreSQL: every connection of every process is cut."""
        await asyncio.to_thread(self.postgres.stop)

    async def start_postgres(self) -> None:
        """PostgreSQL again, on the same data directory and port."""
        url = await asyncio.to_thread(self.postgres.start)
        assert url == self.database_url, (url, self.database_url)

    async def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Rows of one statement on the stack's database (for checks the API cannot make)."""
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as conn:
            cur = await conn.execute(statement.encode(), params)
            return list(await cur.fetchall())


@contextlib.asynccontextmanager
async def running_stack(workdir: Path, config: StackConfig | None = None) -> AsyncIterator[Stack]:
    """Starts the stack in `workdir` and stops every part of it on exit."""
    stack = Stack(workdir, config or StackConfig())
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()
