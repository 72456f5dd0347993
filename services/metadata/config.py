"""Settings of the metadata service, read once from the environment by the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.settings import Addresses, ConfigError, Env, listen_address, service_token


@dataclass(frozen=True)
class Settings:
    """How the metadata service runs."""

    listen: str
    """RENDERFLOW_METADATA_LISTEN: host:port to bind; default RENDERFLOW_METADATA_ADDR's."""
    database_url: str
    """DATABASE_URL: the PostgreSQL database holding the `metadata` schema (required)."""
    pool_min_size: int = 2
    """RENDERFLOW_METADATA_POOL_MIN: connections the pool keeps open."""
    pool_max_size: int = 10
    """RENDERFLOW_METADATA_POOL_MAX: most connections the pool opens."""
    change_retention_s: float = 7 * 86_400.0
    """RENDERFLOW_METADATA_CHANGE_RETENTION_S: how long the change feed keeps a change (7 days)."""
    change_poll_s: float = 5.0
    """RENDERFLOW_METADATA_CHANGE_POLL_S: the change feed's fallback poll when no NOTIFY arrives."""
    prune_interval_s: float = 3_600.0
    """RENDERFLOW_METADATA_PRUNE_INTERVAL_S: how often changes past retention are deleted."""
    drain_grace_s: float = 10.0
    """RENDERFLOW_METADATA_DRAIN_GRACE_S: how long calls in flight may finish at shutdown."""
    log_level: str = "INFO"
    """RENDERFLOW_LOG_LEVEL: the lowest level logged."""
    service_token: str | None = field(default=None, repr=False)
    """RENDERFLOW_SERVICE_TOKEN: required of every caller (`from_env` insists on it);
    None, for settings made in code, serves every caller."""

    @classmethod
    def from_env(cls, env: Env) -> Settings:
        """Settings from environment variables; ConfigError names a missing or malformed one."""
        database_url = env.optional("DATABASE_URL")
        if database_url is None:
            raise ConfigError("DATABASE_URL must be set to the PostgreSQL database of the metadata service")
        pool_min = env.int("RENDERFLOW_METADATA_POOL_MIN", cls.pool_min_size, minimum=0)
        pool_max = env.int("RENDERFLOW_METADATA_POOL_MAX", cls.pool_max_size, minimum=1)
        if pool_max < pool_min:
            raise ConfigError(
                f"RENDERFLOW_METADATA_POOL_MAX ({pool_max}) must be at least "
                f"RENDERFLOW_METADATA_POOL_MIN ({pool_min})"
            )
        return cls(
            listen=listen_address(Addresses.from_env(env).metadata, env, "RENDERFLOW_METADATA_LISTEN"),
            database_url=database_url,
            pool_min_size=pool_min,
            pool_max_size=pool_max,
            change_retention_s=env.float(
                "RENDERFLOW_METADATA_CHANGE_RETENTION_S", cls.change_retention_s, minimum=1.0
            ),
            change_poll_s=env.float("RENDERFLOW_METADATA_CHANGE_POLL_S", cls.change_poll_s, minimum=0.05),
            prune_interval_s=env.float(
                "RENDERFLOW_METADATA_PRUNE_INTERVAL_S", cls.prune_interval_s, minimum=1.0
            ),
            drain_grace_s=env.float("RENDERFLOW_METADATA_DRAIN_GRACE_S", cls.drain_grace_s, minimum=0.0),
            log_level=env.str("RENDERFLOW_LOG_LEVEL", cls.log_level),
            service_token=service_token(env),
        )
