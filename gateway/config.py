"""The gateway's settings, read once from the environment by the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.settings import Addresses, Env


@dataclass(frozen=True)
class Budgets:
    """Slow-operation thresholds of the submit path's phases, in milliseconds."""

    auth_ms: float = 100.0
    """RENDERFLOW_BUDGET_AUTH_MS: API key to user (cached)."""
    validation_ms: float = 50.0
    """RENDERFLOW_BUDGET_VALIDATION_MS: reading and validating the request."""
    db_ms: float = 200.0
    """RENDERFLOW_BUDGET_DB_MS: metadata calls of one request."""
    enqueue_ms: float = 50.0
    """RENDERFLOW_BUDGET_ENQUEUE_MS: generation.Submit."""

    @classmethod
    def from_env(cls, env: Env) -> Budgets:
        return cls(
            auth_ms=env.float("RENDERFLOW_BUDGET_AUTH_MS", cls.auth_ms, minimum=0),
            validation_ms=env.float("RENDERFLOW_BUDGET_VALIDATION_MS", cls.validation_ms, minimum=0),
            db_ms=env.float("RENDERFLOW_BUDGET_DB_MS", cls.db_ms, minimum=0),
            enqueue_ms=env.float("RENDERFLOW_BUDGET_ENQUEUE_MS", cls.enqueue_ms, minimum=0),
        )

    def of(self, phase: str) -> float | None:
        """The budget of `phase`, or None for phases without one."""
        value = getattr(self, f"{phase}_ms", None)
        return value if isinstance(value, float) else None


@dataclass(frozen=True)
class Settings:
    """Everything the gateway needs to run; built once by `from_env` and passed down."""

    host: str = "127.0.0.1"
    """RENDERFLOW_GATEWAY_HOST: the interface to listen on."""
    port: int = 8080
    """RENDERFLOW_GATEWAY_PORT: the TCP port to listen on (0 picks a free one)."""
    addresses: Addresses = field(default_factory=Addresses)
    """RENDERFLOW_METADATA_ADDR, RENDERFLOW_GENERATION_ADDR: where the services are reached."""
    auth_cache_ttl_s: float = 30.0
    """RENDERFLOW_GATEWAY_AUTH_CACHE_TTL_S: how long an API key's user is cached (revocations
    drop entries at once through the metadata change feed)."""
    max_body_bytes: int = 1024 * 1024
    """RENDERFLOW_GATEWAY_MAX_BODY_BYTES: larger request bodies are refused with 413."""
    sse_heartbeat_s: float = 15.0
    """RENDERFLOW_GATEWAY_SSE_HEARTBEAT_S: idle time after which an event stream sends a comment."""
    rpc_timeout_s: float = 5.0
    """RENDERFLOW_GATEWAY_RPC_TIMEOUT_S: deadline of each unary call to a service."""
    output_timeout_s: float = 300.0
    """RENDERFLOW_GATEWAY_OUTPUT_TIMEOUT_S: deadline of one output download from generation."""
    shutdown_grace_s: float = 10.0
    """RENDERFLOW_GATEWAY_SHUTDOWN_GRACE_S: how long requests in flight may finish on SIGTERM."""
    log_level: str = "INFO"
    """RENDERFLOW_LOG_LEVEL: the logging level."""
    budgets: Budgets = field(default_factory=Budgets)
    """RENDERFLOW_BUDGET_*_MS: phase budgets (see `Budgets`)."""

    @classmethod
    def from_env(cls, env: Env) -> Settings:
        return cls(
            host=env.str("RENDERFLOW_GATEWAY_HOST", cls.host),
            port=env.int("RENDERFLOW_GATEWAY_PORT", cls.port, minimum=0),
            addresses=Addresses.from_env(env),
            auth_cache_ttl_s=env.float(
                "RENDERFLOW_GATEWAY_AUTH_CACHE_TTL_S", cls.auth_cache_ttl_s, minimum=0
            ),
            max_body_bytes=env.int("RENDERFLOW_GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
            sse_heartbeat_s=env.float(
                "RENDERFLOW_GATEWAY_SSE_HEARTBEAT_S", cls.sse_heartbeat_s, minimum=0.01
            ),
            rpc_timeout_s=env.float("RENDERFLOW_GATEWAY_RPC_TIMEOUT_S", cls.rpc_timeout_s, minimum=0.01),
            output_timeout_s=env.float(
                "RENDERFLOW_GATEWAY_OUTPUT_TIMEOUT_S", cls.output_timeout_s, minimum=0.01
            ),
            shutdown_grace_s=env.float(
                "RENDERFLOW_GATEWAY_SHUTDOWN_GRACE_S", cls.shutdown_grace_s, minimum=0
            ),
            log_level=env.str("RENDERFLOW_LOG_LEVEL", cls.log_level),
            budgets=Budgets.from_env(env),
        )
