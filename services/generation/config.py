"""Settings of the generation server and of its worker processes, read once from the environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from shared.settings import Addresses, ConfigError, Env, listen_address, run_dir


def _database_url(env: Env) -> str:
    url = env.optional("DATABASE_URL")
    if url is None:
        raise ConfigError("DATABASE_URL is required by the generation service")
    return url


def _artifact_dir(env: Env) -> Path:
    return Path(env.str("RENDERFLOW_ARTIFACT_DIR", str(run_dir(env) / "artifacts"))).resolve()


@dataclass(frozen=True)
class Settings:
    """The generation gRPC server."""

    listen: str
    """RENDERFLOW_GENERATION_LISTEN: host:port to bind; default the generation address of `Addresses`."""
    database_url: str
    """DATABASE_URL: the PostgreSQL holding schema `generation` (required)."""
    artifact_dir: Path
    """RENDERFLOW_ARTIFACT_DIR: where outputs are stored; default `<run dir>/artifacts`."""
    db_poll_only: bool = False
    """RENDERFLOW_DB_POLL_ONLY: never LISTEN (for poolers in transaction mode); poll instead."""
    poll_interval_s: float = 5.0
    """RENDERFLOW_WATCH_POLL_S: how often watchers re-read the event log as a safety net
    (the only source of live events when poll-only)."""
    stall_after_s: float = 60.0
    """RENDERFLOW_STALL_AFTER_S: a running render without progress for this long is `stalled`."""
    drain_grace_s: float = 5.0
    """RENDERFLOW_DRAIN_GRACE_S: how long calls in flight may finish on shutdown."""
    pool_max: int = 10
    """RENDERFLOW_GENERATION_POOL_MAX: most database connections of the server."""

    @classmethod
    def from_env(cls, env: Env) -> Settings:
        poll_only = env.bool("RENDERFLOW_DB_POLL_ONLY", False)
        return cls(
            listen=listen_address(Addresses.from_env(env).generation, env, "RENDERFLOW_GENERATION_LISTEN"),
            database_url=_database_url(env),
            artifact_dir=_artifact_dir(env),
            db_poll_only=poll_only,
            poll_interval_s=env.float("RENDERFLOW_WATCH_POLL_S", 1.0 if poll_only else 5.0, minimum=0.05),
            stall_after_s=env.float("RENDERFLOW_STALL_AFTER_S", 60.0, minimum=1.0),
            drain_grace_s=env.float("RENDERFLOW_DRAIN_GRACE_S", 5.0, minimum=0.0),
            pool_max=env.int("RENDERFLOW_GENERATION_POOL_MAX", 10, minimum=2),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process: how many renders it runs at once, and how it holds them."""

    database_url: str
    """DATABASE_URL: the PostgreSQL holding schema `generation` (required)."""
    artifact_dir: Path
    """RENDERFLOW_ARTIFACT_DIR: where outputs are stored; default `<run dir>/artifacts`."""
    imagefetch_addr: str = Addresses.imagefetch
    """RENDERFLOW_IMAGEFETCH_ADDR: the image-fetch service, for reference URLs."""
    worker_id: str = ""
    """RENDERFLOW_WORKER_ID: the name stamped on claimed jobs; default `<host>-<pid>`."""
    concurrency: int = 4
    """RENDERFLOW_WORKER_CONCURRENCY: renders run at once by this process."""
    lease_s: float = 30.0
    """RENDERFLOW_WORKER_LEASE_S: how long a claim holds without a heartbeat."""
    heartbeat_s: float = 10.0
    """RENDERFLOW_WORKER_HEARTBEAT_S: how often leases are renewed (well below the lease)."""
    rescue_interval_s: float = 5.0
    """RENDERFLOW_WORKER_RESCUE_S: how often expired leases are requeued (or failed)."""
    max_attempts: int = 3
    """RENDERFLOW_MAX_ATTEMPTS: attempts per render before it fails."""
    retry_base_s: float = 1.0
    """RENDERFLOW_RETRY_BASE_S: backoff before the 2nd attempt; doubles after each (with jitter)."""
    retry_max_s: float = 60.0
    """RENDERFLOW_RETRY_MAX_S: the cap of that backoff."""
    poll_interval_s: float = 5.0
    """RENDERFLOW_WORKER_POLL_S: how often the queue is polled when no NOTIFY wakes the worker."""
    db_poll_only: bool = False
    """RENDERFLOW_DB_POLL_ONLY: never LISTEN (for poolers in transaction mode); poll instead."""
    shutdown_grace_s: float = 20.0
    """RENDERFLOW_WORKER_GRACE_S: on SIGTERM, how long renders in flight may finish before they
    are handed back to the queue."""
    progress_interval_s: float = 0.1
    """RENDERFLOW_PROGRESS_INTERVAL_S: at most one progress event per render this often."""
    image_fetch_timeout_s: float = 5.0
    """RENDERFLOW_IMAGE_FETCH_TIMEOUT_S: hard limit on fetching a reference image."""
    procedural_step_ms: float = 0.0
    """RENDERFLOW_PROCEDURAL_STEP_MS: latency the procedural backend adds to each step."""

    @classmethod
    def from_env(cls, env: Env) -> WorkerSettings:
        lease_s = env.float("RENDERFLOW_WORKER_LEASE_S", 30.0, minimum=0.5)
        heartbeat_s = env.float("RENDERFLOW_WORKER_HEARTBEAT_S", lease_s / 3, minimum=0.05)
        if heartbeat_s >= lease_s:
            raise ConfigError(
                f"RENDERFLOW_WORKER_HEARTBEAT_S must be below the lease ({lease_s:g} s), got {heartbeat_s:g}"
            )
        return cls(
            database_url=_database_url(env),
            artifact_dir=_artifact_dir(env),
            imagefetch_addr=Addresses.from_env(env).imagefetch,
            worker_id=env.str("RENDERFLOW_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            concurrency=env.int("RENDERFLOW_WORKER_CONCURRENCY", 4, minimum=1),
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            rescue_interval_s=env.float("RENDERFLOW_WORKER_RESCUE_S", min(5.0, lease_s), minimum=0.05),
            max_attempts=env.int("RENDERFLOW_MAX_ATTEMPTS", 3, minimum=1),
            retry_base_s=env.float("RENDERFLOW_RETRY_BASE_S", 1.0, minimum=0.0),
            retry_max_s=env.float("RENDERFLOW_RETRY_MAX_S", 60.0, minimum=0.0),
            poll_interval_s=env.float("RENDERFLOW_WORKER_POLL_S", 5.0, minimum=0.05),
            db_poll_only=env.bool("RENDERFLOW_DB_POLL_ONLY", False),
            shutdown_grace_s=env.float("RENDERFLOW_WORKER_GRACE_S", 20.0, minimum=0.0),
            progress_interval_s=env.float("RENDERFLOW_PROGRESS_INTERVAL_S", 0.1, minimum=0.0),
            image_fetch_timeout_s=env.float("RENDERFLOW_IMAGE_FETCH_TIMEOUT_S", 5.0, minimum=0.1),
            procedural_step_ms=env.float("RENDERFLOW_PROCEDURAL_STEP_MS", 0.0, minimum=0.0),
        )
