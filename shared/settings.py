"""Reading settings from the environment: typed, validated, and failing with the variable's name.

Entry points build their settings once (a frozen dataclass per service with `from_env()`) and
pass them down; nothing else reads `os.environ`.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable and the bad value."""


class Env:
    """Typed access to a mapping of environment variables (the process environment by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        value = self._environ.get(name)
        return default if value is None or value == "" else value

    def optional(self, name: builtins.str) -> builtins.str | None:
        value = self._environ.get(name)
        return None if value is None or value == "" else value

    def int(
        self, name: builtins.str, default: builtins.int, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        raw = self._environ.get(name)
        if raw is None or raw == "":
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
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def list(self, name: builtins.str) -> list[builtins.str]:
        raw = self._environ.get(name, "")
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
