"""The gateway's settings, read once from the environment by the entry point."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from shared.settings import Addresses, ConfigError, Env, service_token
from shared.telemetry import Budgets

# Connections asyncio may accept in one go (aiohttp's listen backlog) before the cap closes them.
_ACCEPT_BATCH = 128


def default_max_connections() -> int:
    """The open-file limit (soft RLIMIT_NOFILE) less a reserve: max(64, 10 %) for everything else
    that needs a descriptor (upstream channels, log files, Redis, the listening sockets), and one
    accept batch, so that accepting never fails for want of a descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - max(64, soft // 10) - _ACCEPT_BATCH)


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
    max_streams_per_key: int = 100
    """RENDERFLOW_GATEWAY_MAX_STREAMS_PER_KEY: event streams (SSE and WebSocket) one API key may have
    open at once in one gateway process; more is 429 `quota_exceeded`."""
    watch_linger_s: float = 2.0
    """RENDERFLOW_GATEWAY_WATCH_LINGER_S: how long a render's upstream Watch outlives its last
    watcher, so that a client reconnecting at once does not start another."""
    max_wait_s: float = 60.0
    """RENDERFLOW_GATEWAY_MAX_WAIT_S: the longest `Prefer: wait=N` honoured (larger N is clamped)."""
    rpc_timeout_s: float = 5.0
    """RENDERFLOW_GATEWAY_RPC_TIMEOUT_S: deadline of each unary call to a service."""
    output_timeout_s: float = 300.0
    """RENDERFLOW_GATEWAY_OUTPUT_TIMEOUT_S: deadline of one output download from generation."""
    shutdown_grace_s: float = 10.0
    """RENDERFLOW_GATEWAY_DRAIN_GRACE_S: how long requests in flight may finish on SIGTERM."""
    log_level: str = "INFO"
    """RENDERFLOW_LOG_LEVEL: the logging level."""
    budgets: Budgets = field(default_factory=Budgets)
    """RENDERFLOW_BUDGET_*_MS: phase budgets (see `Budgets`)."""
    rate_limit_per_s: float = 20.0
    """RENDERFLOW_GATEWAY_RATE_LIMIT_PER_S: submits per second each API key may sustain (0 = no limit)."""
    rate_limit_burst: int = 40
    """RENDERFLOW_GATEWAY_RATE_LIMIT_BURST: submits an API key may make at once, after a quiet spell (0 =
    no limit); a batch of n renders counts n, and a batch larger than the burst is refused."""
    cache_url: str | None = None
    """RENDERFLOW_CACHE_URL: the shared cache, `redis://[:password@]host:port/db`: the gateways keep
    their rate-limit state there, the image-fetch service the images it fetched; unset or
    `memory://`, each process keeps its own."""
    cache_timeout_s: float = 0.5
    """RENDERFLOW_CACHE_TIMEOUT_S: longest wait for Redis; past it a submit is let through."""
    header_timeout_s: float = 10.0
    """RENDERFLOW_GATEWAY_HEADER_TIMEOUT_S: a connection that has not sent a whole request head
    (request line and headers) this long after it opened, or after its previous response, is closed."""
    body_timeout_s: float = 30.0
    """RENDERFLOW_GATEWAY_BODY_TIMEOUT_S: a request body not all there this long after its head is
    answered 408 `request_timeout`, and its connection closed."""
    max_connections_per_client: int = 256
    """RENDERFLOW_GATEWAY_MAX_CONNECTIONS_PER_CLIENT: open connections one client IP address may
    have; more are closed as soon as they are accepted."""
    max_connections: int = field(default_factory=default_max_connections)
    """RENDERFLOW_GATEWAY_MAX_CONNECTIONS: open connections in all; more are closed as soon as they
    are accepted. By default the process's open-file limit less a reserve (`default_max_connections`)."""
    service_token: str | None = field(default=None, repr=False)
    """RENDERFLOW_SERVICE_TOKEN: carried on every call to the services (`from_env` insists on it);
    None, for settings made in code, calls without it."""

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
            max_streams_per_key=env.int(
                "RENDERFLOW_GATEWAY_MAX_STREAMS_PER_KEY", cls.max_streams_per_key, minimum=1
            ),
            watch_linger_s=env.float("RENDERFLOW_GATEWAY_WATCH_LINGER_S", cls.watch_linger_s, minimum=0),
            max_wait_s=env.float("RENDERFLOW_GATEWAY_MAX_WAIT_S", cls.max_wait_s, minimum=0),
            rpc_timeout_s=env.float("RENDERFLOW_GATEWAY_RPC_TIMEOUT_S", cls.rpc_timeout_s, minimum=0.01),
            output_timeout_s=env.float(
                "RENDERFLOW_GATEWAY_OUTPUT_TIMEOUT_S", cls.output_timeout_s, minimum=0.01
            ),
            shutdown_grace_s=env.float("RENDERFLOW_GATEWAY_DRAIN_GRACE_S", cls.shutdown_grace_s, minimum=0),
            log_level=env.str("RENDERFLOW_LOG_LEVEL", cls.log_level),
            budgets=Budgets.from_env(env),
            rate_limit_per_s=env.float(
                "RENDERFLOW_GATEWAY_RATE_LIMIT_PER_S", cls.rate_limit_per_s, minimum=0
            ),
            rate_limit_burst=env.int("RENDERFLOW_GATEWAY_RATE_LIMIT_BURST", cls.rate_limit_burst, minimum=0),
            cache_url=_cache_url(env.optional("RENDERFLOW_CACHE_URL")),
            cache_timeout_s=env.float("RENDERFLOW_CACHE_TIMEOUT_S", cls.cache_timeout_s, minimum=0.001),
            header_timeout_s=env.float(
                "RENDERFLOW_GATEWAY_HEADER_TIMEOUT_S", cls.header_timeout_s, minimum=0.01
            ),
            body_timeout_s=env.float("RENDERFLOW_GATEWAY_BODY_TIMEOUT_S", cls.body_timeout_s, minimum=0.01),
            max_connections_per_client=env.int(
                "RENDERFLOW_GATEWAY_MAX_CONNECTIONS_PER_CLIENT", cls.max_connections_per_client, minimum=1
            ),
            max_connections=env.int(
                "RENDERFLOW_GATEWAY_MAX_CONNECTIONS", default_max_connections(), minimum=1
            ),
            service_token=service_token(env),
        )


def _cache_url(value: str | None) -> str | None:
    # The URL may hold a password: name the variable and the scheme, never echo the value.
    if value is None:
        return None
    try:
        scheme = urlsplit(value).scheme
    except ValueError:
        raise ConfigError("RENDERFLOW_CACHE_URL is not a URL") from None
    if scheme not in ("memory", "redis", "rediss"):
        raise ConfigError(f"RENDERFLOW_CACHE_URL must be memory:// or redis://..., got scheme {scheme!r}")
    return None if scheme == "memory" else value
