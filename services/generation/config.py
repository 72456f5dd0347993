"""Settings of the generation server and of its worker processes, read once from the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.generation.artifacts import ArtifactStore, LocalArtifactStore
from services.generation.backends.selection import BackendSettings
from services.generation.object_store import ObjectStoreSettings, S3ArtifactStore
from services.generation.pacing import parse_rates
from services.generation.uploads.settings import UploadSettings
from services.generation.webhooks.settings import WebhookSettings
from shared.settings import Addresses, ConfigError, Env, listen_address, run_dir, service_token
from shared.telemetry import Budgets


def _database_url(env: Env) -> str:
    url = env.optional("DATABASE_URL")
    if url is None:
        raise ConfigError("DATABASE_URL is required by the generation service")
    return url


def artifact_store(directory: Path, bucket: ObjectStoreSettings | None) -> ArtifactStore:
    """The store outputs go to: the bucket when one is set, else the directory."""
    return S3ArtifactStore(bucket) if bucket is not None else LocalArtifactStore(directory)


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
    metadata_addr: str
    """RENDERFLOW_METADATA_ADDR: the metadata service, which says what a submit's project, chain and
    rules are (cached here, kept current by its change feed)."""
    artifact_s3: ObjectStoreSettings | None = None
    """RENDERFLOW_ARTIFACT_S3_*: the bucket outputs are stored in instead (when
    RENDERFLOW_ARTIFACT_S3_BUCKET is set)."""
    metadata_timeout_s: float = 2.0
    """RENDERFLOW_GENERATION_METADATA_TIMEOUT_S: deadline of one read from metadata on a cache miss."""
    catalog_ttl_s: float = 300.0
    """RENDERFLOW_GENERATION_CATALOG_TTL_S: how long a project, chain and rules stay cached without a change
    (changes drop them at once; 0: no cache)."""
    db_poll_only: bool = False
    """RENDERFLOW_DB_POLL_ONLY: never LISTEN (for poolers in transaction mode); poll instead."""
    poll_interval_s: float = 5.0
    """RENDERFLOW_GENERATION_WATCH_POLL_S: how often watchers re-read the event log as a safety net
    (the only source of live events when poll-only)."""
    deadline_poll_s: float = 0.5
    """RENDERFLOW_GENERATION_DEADLINE_POLL_S: how often queued renders past their deadline are looked
    for (one ends `expired` within about this long of its deadline, workers or none)."""
    output_retention_s: float = 0.0
    """RENDERFLOW_GENERATION_OUTPUT_RETENTION_S: how long an output is kept once its render succeeded,
    unless the request asks otherwise (0: for ever)."""
    max_retention_s: float = 0.0
    """RENDERFLOW_GENERATION_MAX_RETENTION_S: the longest retention a request may ask for (0: any)."""
    record_retention_s: float = 0.0
    """RENDERFLOW_GENERATION_RECORD_RETENTION_S: how long a render's record (and what is left of its
    output) is kept once it ended (0: for ever)."""
    retention_sweep_s: float = 60.0
    """RENDERFLOW_GENERATION_RETENTION_SWEEP_S: how often outputs and records past their retention
    are looked for."""
    stall_after_s: float = 60.0
    """RENDERFLOW_GENERATION_STALL_AFTER_S: a running render without progress for this long is `stalled`."""
    drain_grace_s: float = 5.0
    """RENDERFLOW_GENERATION_DRAIN_GRACE_S: how long calls in flight may finish on shutdown."""
    pool_max: int = 10
    """RENDERFLOW_GENERATION_POOL_MAX: most database connections of the server."""
    queue_metrics_s: float = 5.0
    """RENDERFLOW_GENERATION_QUEUE_METRICS_S: how often the queue depth and running gauges are refreshed."""
    max_active_renders: int = 200
    """RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS: the most renders one user may have queued or running;
    a submit beyond it is refused with `quota_exceeded` (0: no limit)."""
    prefetch_addr: str = ""
    """RENDERFLOW_GENERATION_PREFETCH: whether Submit asks the image-fetch service
    (RENDERFLOW_IMAGEFETCH_ADDR) to prefetch reference URLs into its cache, so that the worker finds
    them there (default `true`); the address, empty when off."""
    prefetch_timeout_s: float = 5.0
    """RENDERFLOW_GENERATION_PREFETCH_TIMEOUT_S: deadline of one prefetch."""
    prefetch_concurrency: int = 8
    """RENDERFLOW_GENERATION_PREFETCH_CONCURRENCY: prefetches in flight at once."""
    service_token: str | None = field(default=None, repr=False)
    """RENDERFLOW_SERVICE_TOKEN: required of every caller, and carried on prefetches (`from_env`
    insists on it); None, for settings made in code, serves every caller and calls without it."""
    imagefetch_addr: str = ""
    """RENDERFLOW_IMAGEFETCH_ADDR: the image-fetch service, which sends webhook deliveries (and
    prefetches); empty (in code only): no deliveries are sent from this process."""
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    uploads: UploadSettings = field(default_factory=UploadSettings)

    @classmethod
    def from_env(cls, env: Env) -> Settings:
        poll_only = env.bool("RENDERFLOW_DB_POLL_ONLY", False)
        return cls(
            listen=listen_address(Addresses.from_env(env).generation, env, "RENDERFLOW_GENERATION_LISTEN"),
            database_url=_database_url(env),
            artifact_dir=_artifact_dir(env),
            artifact_s3=ObjectStoreSettings.from_env(env),
            metadata_addr=Addresses.from_env(env).metadata,
            metadata_timeout_s=env.float("RENDERFLOW_GENERATION_METADATA_TIMEOUT_S", 2.0, minimum=0.01),
            catalog_ttl_s=env.float("RENDERFLOW_GENERATION_CATALOG_TTL_S", 300.0, minimum=0),
            db_poll_only=poll_only,
            poll_interval_s=env.float(
                "RENDERFLOW_GENERATION_WATCH_POLL_S", 1.0 if poll_only else 5.0, minimum=0.05
            ),
            stall_after_s=env.float("RENDERFLOW_GENERATION_STALL_AFTER_S", 60.0, minimum=1.0),
            deadline_poll_s=env.float("RENDERFLOW_GENERATION_DEADLINE_POLL_S", 0.5, minimum=0.05),
            output_retention_s=env.float("RENDERFLOW_GENERATION_OUTPUT_RETENTION_S", 0.0, minimum=0.0),
            max_retention_s=env.float("RENDERFLOW_GENERATION_MAX_RETENTION_S", 0.0, minimum=0.0),
            record_retention_s=env.float("RENDERFLOW_GENERATION_RECORD_RETENTION_S", 0.0, minimum=0.0),
            retention_sweep_s=env.float("RENDERFLOW_GENERATION_RETENTION_SWEEP_S", 60.0, minimum=0.05),
            drain_grace_s=env.float("RENDERFLOW_GENERATION_DRAIN_GRACE_S", 5.0, minimum=0.0),
            pool_max=env.int("RENDERFLOW_GENERATION_POOL_MAX", 10, minimum=2),
            queue_metrics_s=env.float("RENDERFLOW_GENERATION_QUEUE_METRICS_S", 5.0, minimum=0.05),
            max_active_renders=env.int("RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS", 200, minimum=0),
            prefetch_addr=Addresses.from_env(env).imagefetch
            if env.bool("RENDERFLOW_GENERATION_PREFETCH", True)
            else "",
            prefetch_timeout_s=env.float("RENDERFLOW_GENERATION_PREFETCH_TIMEOUT_S", 5.0, minimum=0.1),
            prefetch_concurrency=env.int("RENDERFLOW_GENERATION_PREFETCH_CONCURRENCY", 8, minimum=1),
            service_token=service_token(env),
            imagefetch_addr=Addresses.from_env(env).imagefetch,
            webhooks=WebhookSettings.from_env(env),
            uploads=UploadSettings.from_env(env),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process: how many renders it runs at once, and how it holds them."""

    database_url: str
    """DATABASE_URL: the PostgreSQL holding schema `generation` (required)."""
    artifact_dir: Path
    """RENDERFLOW_ARTIFACT_DIR: where outputs are stored; default `<run dir>/artifacts`."""
    artifact_s3: ObjectStoreSettings | None = None
    """RENDERFLOW_ARTIFACT_S3_*: the bucket outputs are stored in instead (when
    RENDERFLOW_ARTIFACT_S3_BUCKET is set)."""
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
    """RENDERFLOW_WORKER_MAX_ATTEMPTS: attempts per render before it fails."""
    retry_base_s: float = 1.0
    """RENDERFLOW_WORKER_RETRY_BASE_S: backoff before the 2nd attempt; doubles after each (with jitter)."""
    retry_max_s: float = 60.0
    """RENDERFLOW_WORKER_RETRY_MAX_S: the cap of that backoff."""
    poll_interval_s: float = 5.0
    """RENDERFLOW_WORKER_POLL_S: how often the queue is polled when no NOTIFY wakes the worker."""
    db_poll_only: bool = False
    """RENDERFLOW_DB_POLL_ONLY: never LISTEN (for poolers in transaction mode); poll instead."""
    shutdown_grace_s: float = 20.0
    """RENDERFLOW_WORKER_DRAIN_GRACE_S: on SIGTERM, how long renders in flight may finish before they
    are handed back to the queue."""
    progress_interval_s: float = 0.1
    """RENDERFLOW_WORKER_PROGRESS_INTERVAL_S: at most one progress event per render this often; a phase
    that ends sooner is reported with the next event rather than on its own."""
    image_fetch_timeout_s: float = 5.0
    """RENDERFLOW_WORKER_IMAGEFETCH_TIMEOUT_S: hard limit on fetching a reference image."""
    image_fetch_outage_s: float = 60.0
    """RENDERFLOW_WORKER_IMAGEFETCH_OUTAGE_S: how long a render waits for the image-fetch service to
    answer again (it is down, restarting) before that counts as a failed attempt: an outage of our
    own plumbing should not spend the attempts of a user's render."""
    store_outage_s: float = 60.0
    """RENDERFLOW_WORKER_STORE_OUTAGE_S: how long a render waits for an object store that is down to
    take its output before that counts as a failed attempt (`store_failed`), for the same reason."""
    procedural_step_ms: float = 0.0
    """RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS: latency the procedural backend adds to each step."""
    backend: BackendSettings = field(default_factory=BackendSettings)
    """RENDERFLOW_BACKEND (or per kind RENDERFLOW_BACKEND_IMAGE / _VIDEO): `procedural`, `http` or (for
    images) `openai`; with `http`, RENDERFLOW_BACKEND_HTTP_URL and the other RENDERFLOW_BACKEND_HTTP_*
    settings; with `openai`, RENDERFLOW_BACKEND_OPENAI_URL and the other RENDERFLOW_BACKEND_OPENAI_*."""
    budgets: Budgets = field(default_factory=Budgets)
    """RENDERFLOW_BUDGET_<PHASE>_MS: a phase over its budget logs a `slow operation` warning."""
    tenant_max_running: int = 8
    """RENDERFLOW_WORKER_TENANT_MAX_RUNNING: the most renders of one user running at once, across all
    workers (0: no limit)."""
    tenant_reserved_slots: int = 1
    """RENDERFLOW_WORKER_TENANT_RESERVED_SLOTS: slots of the live workers that no one user's renders may
    hold, kept for whoever submits next (0: a user may take every slot)."""
    backend_rate_limits: Mapping[str, float] = field(default_factory=dict)
    """RENDERFLOW_BACKEND_RATE_LIMITS: calls per second each backend may start, across all workers,
    e.g. `procedural=0,http=5` (0 or absent: unlimited)."""
    max_duration_image_s: float = 300.0
    """RENDERFLOW_WORKER_MAX_DURATION_IMAGE_S: the most an image's generation may take; past it the render
    fails with `timeout` (not retried)."""
    max_duration_video_s: float = 1800.0
    """RENDERFLOW_WORKER_MAX_DURATION_VIDEO_S: the same for a video."""
    chain_wait_s: float = 60.0
    """RENDERFLOW_WORKER_CHAIN_WAIT_S: how long a chain render waits for its predecessor to be submitted
    at all (its position was allocated, but the submit may have been lost) before earlier renders
    stand in for it (with none, it runs without a reference, or fails with `dependency_failed` if
    the reference is required); once the predecessor exists it waits as long as that one takes."""
    event_retention_s: float = 7 * 86400.0
    """RENDERFLOW_WORKER_EVENT_RETENTION_S: events of renders that ended longer ago are deleted."""
    service_token: str | None = field(default=None, repr=False)
    """RENDERFLOW_SERVICE_TOKEN: carried on every call to image-fetch (`from_env` insists on it);
    None, for settings made in code, calls without it."""

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
            artifact_s3=ObjectStoreSettings.from_env(env),
            imagefetch_addr=Addresses.from_env(env).imagefetch,
            worker_id=env.str("RENDERFLOW_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            concurrency=env.int("RENDERFLOW_WORKER_CONCURRENCY", 4, minimum=1),
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            rescue_interval_s=env.float("RENDERFLOW_WORKER_RESCUE_S", min(5.0, lease_s), minimum=0.05),
            max_attempts=env.int("RENDERFLOW_WORKER_MAX_ATTEMPTS", 3, minimum=1),
            retry_base_s=env.float("RENDERFLOW_WORKER_RETRY_BASE_S", 1.0, minimum=0.0),
            retry_max_s=env.float("RENDERFLOW_WORKER_RETRY_MAX_S", 60.0, minimum=0.0),
            poll_interval_s=env.float("RENDERFLOW_WORKER_POLL_S", 5.0, minimum=0.05),
            db_poll_only=env.bool("RENDERFLOW_DB_POLL_ONLY", False),
            shutdown_grace_s=env.float("RENDERFLOW_WORKER_DRAIN_GRACE_S", 20.0, minimum=0.0),
            progress_interval_s=env.float("RENDERFLOW_WORKER_PROGRESS_INTERVAL_S", 0.1, minimum=0.0),
            image_fetch_timeout_s=env.float("RENDERFLOW_WORKER_IMAGEFETCH_TIMEOUT_S", 5.0, minimum=0.1),
            image_fetch_outage_s=env.float("RENDERFLOW_WORKER_IMAGEFETCH_OUTAGE_S", 60.0, minimum=0.0),
            store_outage_s=env.float("RENDERFLOW_WORKER_STORE_OUTAGE_S", 60.0, minimum=0.0),
            procedural_step_ms=env.float("RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS", 0.0, minimum=0.0),
            backend=BackendSettings.from_env(env),
            budgets=Budgets.from_env(env),
            tenant_max_running=env.int("RENDERFLOW_WORKER_TENANT_MAX_RUNNING", 8, minimum=0),
            tenant_reserved_slots=env.int("RENDERFLOW_WORKER_TENANT_RESERVED_SLOTS", 1, minimum=0),
            backend_rate_limits=parse_rates(
                env.list("RENDERFLOW_BACKEND_RATE_LIMITS"), "RENDERFLOW_BACKEND_RATE_LIMITS"
            ),
            max_duration_image_s=env.float("RENDERFLOW_WORKER_MAX_DURATION_IMAGE_S", 300.0, minimum=0.1),
            max_duration_video_s=env.float("RENDERFLOW_WORKER_MAX_DURATION_VIDEO_S", 1800.0, minimum=0.1),
            chain_wait_s=env.float("RENDERFLOW_WORKER_CHAIN_WAIT_S", 60.0, minimum=0.0),
            event_retention_s=env.float("RENDERFLOW_WORKER_EVENT_RETENTION_S", 7 * 86400.0, minimum=60.0),
            service_token=service_token(env),
        )
