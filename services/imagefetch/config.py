"""Settings of the image-fetch service, read once from the environment by the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field

from yarl import URL

from shared.settings import Addresses, ConfigError, Env, listen_address, service_token
from shared.url_guard import Network, allow_list

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything the image-fetch service can be told; the defaults work on a laptop."""

    listen: str = Addresses.imagefetch
    """RENDERFLOW_IMAGEFETCH_LISTEN: host:port to bind (default: RENDERFLOW_IMAGEFETCH_ADDR)."""
    deadline_s: float = 5.0
    """RENDERFLOW_IMAGEFETCH_DEADLINE_S: total time of a fetch, retries included, when the caller says
    none."""
    max_deadline_s: float = 30.0
    """RENDERFLOW_IMAGEFETCH_MAX_DEADLINE_S: the longest deadline a caller may ask for (of a fetch, or
    of one webhook delivery)."""
    connect_timeout_s: float = 2.0
    """RENDERFLOW_IMAGEFETCH_CONNECT_TIMEOUT_S: time to open one connection to the origin."""
    read_timeout_s: float = 3.0
    """RENDERFLOW_IMAGEFETCH_READ_TIMEOUT_S: longest silence from the origin (headers or body) in an
    attempt."""
    max_attempts: int = 3
    """RENDERFLOW_IMAGEFETCH_MAX_ATTEMPTS: attempts per fetch, first included."""
    backoff_initial_s: float = 0.1
    """RENDERFLOW_IMAGEFETCH_BACKOFF_S: the first wait between attempts, doubled each time, plus jitter."""
    backoff_max_s: float = 1.0
    """RENDERFLOW_IMAGEFETCH_BACKOFF_MAX_S: the longest exponential wait between attempts."""
    retry_after_cap_s: float = 2.0
    """RENDERFLOW_IMAGEFETCH_RETRY_AFTER_CAP_S: the longest an origin's Retry-After is waited for."""
    max_bytes: int = 20 * MIB
    """RENDERFLOW_IMAGEFETCH_MAX_BYTES: the largest image accepted, enforced while streaming."""
    max_pixels: int = 64_000_000
    """RENDERFLOW_IMAGEFETCH_MAX_PIXELS: the largest width x height accepted (decompression bombs)."""
    max_redirects: int = 3
    """RENDERFLOW_IMAGEFETCH_MAX_REDIRECTS: redirect hops followed, each checked like the first URL."""
    allow: tuple[Network, ...] = ()
    """RENDERFLOW_IMAGEFETCH_ALLOW: comma-separated addresses and CIDR networks that reference images
    may come from and webhooks may be delivered to although not public (e.g.
    `127.0.0.1,10.1.0.0/16`); empty by default. Generation reads it too, to refuse a receiver at
    once when it names an address outside it."""
    concurrency: int = 8
    """RENDERFLOW_IMAGEFETCH_CONCURRENCY: fetches of one FetchMany call running at once (callers may ask
    fewer)."""
    deliver_timeout_s: float = 10.0
    """RENDERFLOW_IMAGEFETCH_DELIVER_TIMEOUT_S: time of one webhook delivery attempt, connecting and the
    receiver's answer included, when the caller says none."""
    deliver_concurrency: int = 64
    """RENDERFLOW_IMAGEFETCH_DELIVER_CONCURRENCY: webhook deliveries under way at once, each on a
    connection of its own apart from the fetches' (more wait their turn)."""
    cache_url: str | None = None
    """RENDERFLOW_CACHE_URL: `redis://[:password@]host:port/db` for a shared cache; unset or
    `memory://` for a cache inside the process."""
    cache_namespace: str = "imagefetch:v1"
    """RENDERFLOW_IMAGEFETCH_CACHE_NAMESPACE: prefix of every cache key (separates deployments sharing a
    Redis)."""
    cache_ttl_s: float = 3600.0
    """RENDERFLOW_IMAGEFETCH_CACHE_TTL_S: how long an image is kept; an origin's `max-age` may shorten it."""
    cache_negative_ttl_s: float = 30.0
    """RENDERFLOW_IMAGEFETCH_CACHE_NEGATIVE_TTL_S: how long a 404 is remembered."""
    cache_max_bytes: int = 256 * MIB
    """RENDERFLOW_IMAGEFETCH_CACHE_MAX_BYTES: size of the in-process cache; least recently used entries
    go first."""
    cache_timeout_s: float = 0.5
    """RENDERFLOW_CACHE_TIMEOUT_S: longest wait for one cache operation (a slow cache is a miss)."""
    drain_grace_s: float = 5.0
    """RENDERFLOW_IMAGEFETCH_DRAIN_GRACE_S: time given to calls in flight at shutdown."""
    service_token: str | None = field(default=None, repr=False)
    """RENDERFLOW_SERVICE_TOKEN: required of every caller (`from_env` insists on it);
    None, for settings made in code, serves every caller."""

    @classmethod
    def from_env(cls, env: Env) -> Settings:
        """Settings from `RENDERFLOW_*` variables; ConfigError names a bad one."""
        addresses = Addresses.from_env(env)
        allow = allow_list(env)
        cache_url = env.optional("RENDERFLOW_CACHE_URL")
        if cache_url is not None:
            _check_cache_url(cache_url)
        return cls(
            listen=listen_address(addresses.imagefetch, env, "RENDERFLOW_IMAGEFETCH_LISTEN"),
            deadline_s=env.float("RENDERFLOW_IMAGEFETCH_DEADLINE_S", cls.deadline_s, minimum=0.01),
            max_deadline_s=env.float(
                "RENDERFLOW_IMAGEFETCH_MAX_DEADLINE_S", cls.max_deadline_s, minimum=0.01
            ),
            connect_timeout_s=env.float(
                "RENDERFLOW_IMAGEFETCH_CONNECT_TIMEOUT_S", cls.connect_timeout_s, minimum=0.01
            ),
            read_timeout_s=env.float(
                "RENDERFLOW_IMAGEFETCH_READ_TIMEOUT_S", cls.read_timeout_s, minimum=0.01
            ),
            max_attempts=env.int("RENDERFLOW_IMAGEFETCH_MAX_ATTEMPTS", cls.max_attempts, minimum=1),
            backoff_initial_s=env.float("RENDERFLOW_IMAGEFETCH_BACKOFF_S", cls.backoff_initial_s, minimum=0),
            backoff_max_s=env.float("RENDERFLOW_IMAGEFETCH_BACKOFF_MAX_S", cls.backoff_max_s, minimum=0),
            retry_after_cap_s=env.float(
                "RENDERFLOW_IMAGEFETCH_RETRY_AFTER_CAP_S", cls.retry_after_cap_s, minimum=0
            ),
            max_bytes=env.int("RENDERFLOW_IMAGEFETCH_MAX_BYTES", cls.max_bytes, minimum=1),
            max_pixels=env.int("RENDERFLOW_IMAGEFETCH_MAX_PIXELS", cls.max_pixels, minimum=1),
            max_redirects=env.int("RENDERFLOW_IMAGEFETCH_MAX_REDIRECTS", cls.max_redirects, minimum=0),
            allow=allow,
            concurrency=env.int("RENDERFLOW_IMAGEFETCH_CONCURRENCY", cls.concurrency, minimum=1),
            deliver_timeout_s=env.float(
                "RENDERFLOW_IMAGEFETCH_DELIVER_TIMEOUT_S", cls.deliver_timeout_s, minimum=0.01
            ),
            deliver_concurrency=env.int(
                "RENDERFLOW_IMAGEFETCH_DELIVER_CONCURRENCY", cls.deliver_concurrency, minimum=1
            ),
            cache_url=cache_url,
            cache_namespace=env.str("RENDERFLOW_IMAGEFETCH_CACHE_NAMESPACE", cls.cache_namespace),
            cache_ttl_s=env.float("RENDERFLOW_IMAGEFETCH_CACHE_TTL_S", cls.cache_ttl_s, minimum=0),
            cache_negative_ttl_s=env.float(
                "RENDERFLOW_IMAGEFETCH_CACHE_NEGATIVE_TTL_S", cls.cache_negative_ttl_s, minimum=0
            ),
            cache_max_bytes=env.int("RENDERFLOW_IMAGEFETCH_CACHE_MAX_BYTES", cls.cache_max_bytes, minimum=0),
            cache_timeout_s=env.float("RENDERFLOW_CACHE_TIMEOUT_S", cls.cache_timeout_s, minimum=0.001),
            drain_grace_s=env.float("RENDERFLOW_IMAGEFETCH_DRAIN_GRACE_S", cls.drain_grace_s, minimum=0),
            service_token=service_token(env),
        )


def _check_cache_url(value: str) -> None:
    # The URL may hold a password: name the variable and the scheme, never echo the value.
    try:
        scheme = URL(value).scheme
    except ValueError:
        raise ConfigError("RENDERFLOW_CACHE_URL is not a URL") from None
    if scheme not in ("memory", "redis", "rediss"):
        raise ConfigError(f"RENDERFLOW_CACHE_URL must be memory:// or redis://..., got scheme {scheme!r}")
