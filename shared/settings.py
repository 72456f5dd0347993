"""Reading settings from the environment: typed, validated, and failing with the variable's name.

Entry points build their settings once (a frozen dataclass per service with `from_env()`) and
pass them down; nothing else reads `os.environ`.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)


# Every setting is named RENDERFLOW_<AREA>_<NAME>, the area being the process that reads it (GATEWAY,
# METADATA, IMAGEFETCH, GENERATION, WORKER, LOCAL for `renderflow run`) or what several share
# (BACKEND, CACHE, LOG, METRICS, TRACES, ...); docs/settings.md lists them all.
RENAMED: Final[Mapping[str, tuple[str, ...]]] = {
    # one name per concept: how long work in flight may finish when a process is told to stop
    "RENDERFLOW_DRAIN_GRACE_S": (
        "RENDERFLOW_GENERATION_DRAIN_GRACE_S",
        "RENDERFLOW_IMAGEFETCH_DRAIN_GRACE_S",
    ),
    "RENDERFLOW_GATEWAY_SHUTDOWN_GRACE_S": ("RENDERFLOW_GATEWAY_DRAIN_GRACE_S",),
    "RENDERFLOW_WORKER_GRACE_S": ("RENDERFLOW_WORKER_DRAIN_GRACE_S",),
    # the image-fetch service's own
    "RENDERFLOW_FETCH_ALLOW": ("RENDERFLOW_IMAGEFETCH_ALLOW",),
    "RENDERFLOW_FETCH_BACKOFF_MAX_S": ("RENDERFLOW_IMAGEFETCH_BACKOFF_MAX_S",),
    "RENDERFLOW_FETCH_BACKOFF_S": ("RENDERFLOW_IMAGEFETCH_BACKOFF_S",),
    "RENDERFLOW_FETCH_CONCURRENCY": ("RENDERFLOW_IMAGEFETCH_CONCURRENCY",),
    "RENDERFLOW_FETCH_CONNECT_TIMEOUT_S": ("RENDERFLOW_IMAGEFETCH_CONNECT_TIMEOUT_S",),
    "RENDERFLOW_FETCH_DEADLINE_S": ("RENDERFLOW_IMAGEFETCH_DEADLINE_S",),
    "RENDERFLOW_FETCH_MAX_ATTEMPTS": ("RENDERFLOW_IMAGEFETCH_MAX_ATTEMPTS",),
    "RENDERFLOW_FETCH_MAX_BYTES": ("RENDERFLOW_IMAGEFETCH_MAX_BYTES",),
    "RENDERFLOW_FETCH_MAX_DEADLINE_S": ("RENDERFLOW_IMAGEFETCH_MAX_DEADLINE_S",),
    "RENDERFLOW_FETCH_MAX_PIXELS": ("RENDERFLOW_IMAGEFETCH_MAX_PIXELS",),
    "RENDERFLOW_FETCH_MAX_REDIRECTS": ("RENDERFLOW_IMAGEFETCH_MAX_REDIRECTS",),
    "RENDERFLOW_FETCH_READ_TIMEOUT_S": ("RENDERFLOW_IMAGEFETCH_READ_TIMEOUT_S",),
    "RENDERFLOW_FETCH_RETRY_AFTER_CAP_S": ("RENDERFLOW_IMAGEFETCH_RETRY_AFTER_CAP_S",),
    "RENDERFLOW_CACHE_MAX_BYTES": ("RENDERFLOW_IMAGEFETCH_CACHE_MAX_BYTES",),
    "RENDERFLOW_CACHE_NAMESPACE": ("RENDERFLOW_IMAGEFETCH_CACHE_NAMESPACE",),
    "RENDERFLOW_CACHE_NEGATIVE_TTL_S": ("RENDERFLOW_IMAGEFETCH_CACHE_NEGATIVE_TTL_S",),
    "RENDERFLOW_CACHE_TTL_S": ("RENDERFLOW_IMAGEFETCH_CACHE_TTL_S",),
    # the generation server's
    "RENDERFLOW_METADATA_TIMEOUT_S": ("RENDERFLOW_GENERATION_METADATA_TIMEOUT_S",),
    "RENDERFLOW_CATALOG_TTL_S": ("RENDERFLOW_GENERATION_CATALOG_TTL_S",),
    "RENDERFLOW_WATCH_POLL_S": ("RENDERFLOW_GENERATION_WATCH_POLL_S",),
    "RENDERFLOW_STALL_AFTER_S": ("RENDERFLOW_GENERATION_STALL_AFTER_S",),
    "RENDERFLOW_QUEUE_METRICS_S": ("RENDERFLOW_GENERATION_QUEUE_METRICS_S",),
    "RENDERFLOW_MAX_ACTIVE_RENDERS": ("RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS",),
    "RENDERFLOW_PREFETCH": ("RENDERFLOW_GENERATION_PREFETCH",),
    "RENDERFLOW_PREFETCH_TIMEOUT_S": ("RENDERFLOW_GENERATION_PREFETCH_TIMEOUT_S",),
    "RENDERFLOW_PREFETCH_CONCURRENCY": ("RENDERFLOW_GENERATION_PREFETCH_CONCURRENCY",),
    # the workers'
    "RENDERFLOW_MAX_ATTEMPTS": ("RENDERFLOW_WORKER_MAX_ATTEMPTS",),
    "RENDERFLOW_RETRY_BASE_S": ("RENDERFLOW_WORKER_RETRY_BASE_S",),
    "RENDERFLOW_RETRY_MAX_S": ("RENDERFLOW_WORKER_RETRY_MAX_S",),
    "RENDERFLOW_PROGRESS_INTERVAL_S": ("RENDERFLOW_WORKER_PROGRESS_INTERVAL_S",),
    "RENDERFLOW_TENANT_MAX_RUNNING": ("RENDERFLOW_WORKER_TENANT_MAX_RUNNING",),
    "RENDERFLOW_TENANT_RESERVED_SLOTS": ("RENDERFLOW_WORKER_TENANT_RESERVED_SLOTS",),
    "RENDERFLOW_MAX_DURATION_IMAGE_S": ("RENDERFLOW_WORKER_MAX_DURATION_IMAGE_S",),
    "RENDERFLOW_MAX_DURATION_VIDEO_S": ("RENDERFLOW_WORKER_MAX_DURATION_VIDEO_S",),
    "RENDERFLOW_CHAIN_WAIT_S": ("RENDERFLOW_WORKER_CHAIN_WAIT_S",),
    "RENDERFLOW_EVENT_RETENTION_S": ("RENDERFLOW_WORKER_EVENT_RETENTION_S",),
    "RENDERFLOW_IMAGE_FETCH_TIMEOUT_S": ("RENDERFLOW_WORKER_IMAGEFETCH_TIMEOUT_S",),
    "RENDERFLOW_IMAGE_FETCH_OUTAGE_S": ("RENDERFLOW_WORKER_IMAGEFETCH_OUTAGE_S",),
    # the generator backends'
    "RENDERFLOW_PROCEDURAL_STEP_MS": ("RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS",),
    "RENDERFLOW_HTTP_BACKEND_URL": ("RENDERFLOW_BACKEND_HTTP_URL",),
    "RENDERFLOW_HTTP_BACKEND_TOKEN": ("RENDERFLOW_BACKEND_HTTP_TOKEN",),
    "RENDERFLOW_HTTP_BACKEND_POLL_S": ("RENDERFLOW_BACKEND_HTTP_POLL_S",),
    "RENDERFLOW_HTTP_BACKEND_MAX_WAIT_S": ("RENDERFLOW_BACKEND_HTTP_MAX_WAIT_S",),
    "RENDERFLOW_HTTP_BACKEND_ATTEMPTS": ("RENDERFLOW_BACKEND_HTTP_ATTEMPTS",),
    "RENDERFLOW_HTTP_BACKEND_BACKOFF_S": ("RENDERFLOW_BACKEND_HTTP_BACKOFF_S",),
    "RENDERFLOW_HTTP_BACKEND_BACKOFF_MAX_S": ("RENDERFLOW_BACKEND_HTTP_BACKOFF_MAX_S",),
    "RENDERFLOW_HTTP_BACKEND_TIMEOUT_S": ("RENDERFLOW_BACKEND_HTTP_TIMEOUT_S",),
    "RENDERFLOW_HTTP_BACKEND_MAX_OUTPUT_BYTES": ("RENDERFLOW_BACKEND_HTTP_MAX_OUTPUT_BYTES",),
    # the gateway's
    "RENDERFLOW_RATE_LIMIT_BURST": ("RENDERFLOW_GATEWAY_RATE_LIMIT_BURST",),
    "RENDERFLOW_RATE_LIMIT_PER_S": ("RENDERFLOW_GATEWAY_RATE_LIMIT_PER_S",),
    # the local stack's (`renderflow run`)
    "RENDERFLOW_WORKERS": ("RENDERFLOW_LOCAL_WORKERS",),
    "RENDERFLOW_PG_PORT": ("RENDERFLOW_LOCAL_PG_PORT",),
    "RENDERFLOW_PG_BIN": ("RENDERFLOW_LOCAL_PG_BIN",),
    "RENDERFLOW_LOG_MAX_BYTES": ("RENDERFLOW_LOCAL_LOG_MAX_BYTES",),
    "RENDERFLOW_LOG_BACKUPS": ("RENDERFLOW_LOCAL_LOG_BACKUPS",),
    "RENDERFLOW_METRICS_BASE_PORT": ("RENDERFLOW_LOCAL_METRICS_BASE_PORT",),
    "RENDERFLOW_DEV_API_KEY": ("RENDERFLOW_LOCAL_API_KEY",),
}
"""Old name → its new name(s), each still read (with a warning) for one release when the new
one is not set."""
_OLD_NAMES: Final = {
    new: tuple(o for o, n in RENAMED.items() if new in n) for names in RENAMED.values() for new in names
}
_warned: set[str] = set()


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the bad value."""


class Env:
    """Typed access to a mapping of environment variables (the process environment by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def _raw(self, name: builtins.str) -> builtins.str | None:
        """The variable's value, or that of its old name (warning once); None when unset or empty."""
        value = self._environ.get(name)
        if value:
            return value
        for old in _OLD_NAMES.get(name, ()):
            value = self._environ.get(old)
            if value:
                if old not in _warned:
                    _warned.add(old)
                    log.warning("%s is renamed %s: the old name is read until the next release", old, name)
                return value
        return None

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self._raw(name)
        return default if value is None else value

    def optional(self, name: builtins.str) -> builtins.str | None:
        return self._raw(name)

    def int(
        self, name: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
        return value

    def float(
        self, name: builtins.str, default: builtins.float, *, minimum: builtins.float | None = None
    ) -> builtins.float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def list(self, name: builtins.str) -> list[builtins.str]:
        raw = self._raw(name) or ""
        return [item.strip() for item in raw.split(",") if item.strip()]


@dataclass(frozen=True)
class Addresses:
    """Where each service listens and where its clients reach it (host:port)."""

    metadata: str = "127.0.0.1:50051"
    """RENDERFLOW_METADATA_ADDR: the metadata service."""
    imagefetch: str = "127.0.0.1:50052"
    """RENDERFLOW_IMAGEFETCH_ADDR: the image-fetch service."""
    generation: str = "127.0.0.1:50053"
    """RENDERFLOW_GENERATION_ADDR: the generation service."""

    @classmethod
    def from_env(cls, env: Env) -> Addresses:
        return cls(
            metadata=env.str("RENDERFLOW_METADATA_ADDR", cls.metadata),
            imagefetch=env.str("RENDERFLOW_IMAGEFETCH_ADDR", cls.imagefetch),
            generation=env.str("RENDERFLOW_GENERATION_ADDR", cls.generation),
        )


def listen_address(addr: str, env: Env, variable: str) -> str:
    """The address a service binds: `variable` when set, else the port of `addr` on the same host."""
    return env.str(variable, addr)


def run_dir(env: Env) -> Path:
    """RENDERFLOW_RUN_DIR: local state (database, artifacts, traces, dev key); default `.run`."""
    return Path(env.str("RENDERFLOW_RUN_DIR", ".run")).resolve()


SERVICE_TOKEN = "RENDERFLOW_SERVICE_TOKEN"


def service_token(env: Env) -> str:
    """RENDERFLOW_SERVICE_TOKEN: the secret every call to a Renderflow gRPC service carries and
    every service requires (`shared.service_auth`). Required: a process never runs open by accident."""
    token = env.optional(SERVICE_TOKEN)
    if token is None:
        raise ConfigError(
            f"{SERVICE_TOKEN} must be set: the secret shared by the services and their callers "
            "(`renderflow run` makes one; in a cluster it comes from a Secret)"
        )
    # It travels as gRPC metadata, which is printable ASCII. A secret: never echo it.
    if not re.fullmatch(r"[!-~]{16,}", token):
        raise ConfigError(f"{SERVICE_TOKEN} must be at least 16 printable ASCII characters, without spaces")
    return token
