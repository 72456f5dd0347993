"""Rate limits at the door: a token bucket per API key on the submit routes.

Each key's bucket holds up to `burst` tokens and refills at `rate` tokens a second; a submit takes
one token per render (a batch of n takes n) or is refused with 429 `rate_limited` and a
`Retry-After` after which it would pass; a batch of more renders than the burst could never pass,
and is refused with 422 naming `items`. Responses of the submit routes carry `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset` (draft-ietf-httpapi-ratelimit-headers). Buckets live in
the process when the gateway runs alone, and in Redis when `RENDERFLOW_CACHE_URL` names one, so
that every gateway process draws from the same bucket.

Limits are protection, not correctness: when Redis cannot be reached, submits go through (with a
warning in the log) rather than fail.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from gateway.auth import authenticated
from gateway.config import Settings
from gateway.conventions import BATCH_ROUTES, SUBMIT_ROUTES
from gateway.state import SETTINGS
from gateway.validation import json_body
from shared.errors import RateLimited, ValidationFailed

log = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "gateway:ratelimit:v1:"
REDIS_PAUSE_S = 5.0
"""After a Redis failure, how long submits skip the limit before Redis is tried again."""
_PRUNE_AT = 10_000


@dataclass(frozen=True)
class Decision:
    """The answer of a bucket to one request."""

    allowed: bool
    limit: int
    """The bucket's capacity (the burst)."""
    remaining: int
    """Whole tokens left after this request."""
    reset_s: int
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """When refused: seconds until the request's tokens are there; 0 when allowed."""

    @classmethod
    def of(cls, allowed: bool, tokens: float, cost: int, rate: float, burst: int) -> Decision:
        """The decision for a bucket left with `tokens` after taking (or refusing) `cost`."""
        return cls(
            allowed=allowed,
            limit=burst,
            remaining=max(0, math.floor(tokens)),
            reset_s=math.ceil(max(0.0, burst - tokens) / rate),
            retry_after_s=0.0 if allowed else (cost - tokens) / rate,
        )


class TokenBuckets(Protocol):
    """Token buckets by key (an API key's id)."""

    async def take(self, key: str, cost: int) -> Decision | None:
        """Takes `cost` tokens from `key`'s bucket if it holds them; None when the state cannot be
        reached (the request goes through)."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


def refill(tokens: float, elapsed_s: float, rate: float, burst: int) -> float:
    """The tokens of a bucket that held `tokens` `elapsed_s` seconds ago."""
    return min(float(burst), tokens + max(0.0, elapsed_s) * rate)


class MemoryBuckets:
    """Buckets inside this process (a gateway running alone)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    async def take(self, key: str, cost: int) -> Decision:
        now = self._clock()
        if len(self._buckets) >= _PRUNE_AT:
            self._prune(now)
        tokens, at = self._buckets.get(key, (float(self._burst), now))
        tokens = refill(tokens, now - at, self._rate, self._burst)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        return Decision.of(allowed, tokens, cost, self._rate, self._burst)

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        self._buckets = {
            key: (tokens, at)
            for key, (tokens, at) in self._buckets.items()
            if refill(tokens, now - at, self._rate, self._burst) < self._burst
        }

    async def close(self) -> None:
        self._buckets.clear()


# aiocache has no atomic read-modify-write, and two gateways doing get-then-set would both spend
# the same token; so this talks to Redis directly, in one script that Redis runs atomically. The
# clock is Redis's own (TIME), so that gateways with skewed clocks still agree.
_TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class RedisBuckets:
    """Buckets in Redis, shared by every gateway process using it."""

    def __init__(self, client: redis.asyncio.Redis, rate: float, burst: int) -> None:
        self._client = client
        self._rate = rate
        self._burst = burst
        self._script = client.register_script(_TAKE_SCRIPT)
        self._paused_until = 0.0

    async def take(self, key: str, cost: int) -> Decision | None:
        if time.monotonic() < self._paused_until:
            return None
        try:
            allowed, tokens = await self._script(
                keys=[REDIS_KEY_PREFIX + key], args=[self._rate, self._burst, cost]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            # Fail open, and stop asking for a while: every submit must not wait out a dead Redis.
            self._paused_until = time.monotonic() + REDIS_PAUSE_S
            log.warning(
                "rate limits suspended: Redis unreachable",
                extra={"error": type(exc).__name__, "retry_in_s": REDIS_PAUSE_S},
            )
            return None
        return Decision.of(bool(allowed), float(tokens), cost, self._rate, self._burst)

    async def close(self) -> None:
        await self._client.aclose()


def open_buckets(settings: Settings) -> TokenBuckets | None:
    """The buckets `settings` ask for; None when rate limits are off."""
    rate, burst = settings.rate_limit_per_s, settings.rate_limit_burst
    if rate <= 0 or burst <= 0:
        return None
    if settings.cache_url is None:
        return MemoryBuckets(rate, burst)
    client = redis.asyncio.Redis.from_url(
        settings.cache_url,
        socket_timeout=settings.cache_timeout_s,
        socket_connect_timeout=settings.cache_timeout_s,
    )
    return RedisBuckets(client, rate, burst)


BUCKETS = web.AppKey("rate_limit_buckets", TokenBuckets)
DECISION = web.RequestKey("rate_limit_decision", Decision)


async def rate_limits_context(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: opens the application's buckets (unless limits are off) and closes them."""
    buckets = open_buckets(app[SETTINGS])
    if buckets is None:
        yield
        return
    app[BUCKETS] = buckets
    try:
        yield
    finally:
        await buckets.close()


def _route_of(request: web.Request) -> tuple[str, str] | None:
    resource = request.match_info.route.resource
    return None if resource is None else (request.method, resource.canonical)


async def _cost(request: web.Request, route: tuple[str, str]) -> int:
    if route not in BATCH_ROUTES:
        return 1
    # Parsed once: the handler validates this same document.
    try:
        document: Any = await json_body(request)
    except ValidationFailed:
        return 1  # the handler refuses the body
    items = document.get("items") if isinstance(document, dict) else None
    return max(1, len(items)) if isinstance(items, list) else 1


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Takes a submit's tokens from its API key's bucket before the handler runs, or refuses it."""
    buckets = request.app.get(BUCKETS)
    route = _route_of(request)
    if buckets is None or route is None or route not in SUBMIT_ROUTES:
        return await handler(request)
    caller = await authenticated(request)
    burst = request.app[SETTINGS].rate_limit_burst
    cost = await _cost(request, route)
    if cost > burst:
        # No wait would let it through, so it is not a 429 to retry: the client must split it.
        raise ValidationFailed.field("items", f"must hold at most {burst} renders (the burst)")
    decision = await buckets.take(caller.key_id, cost)
    if decision is not None:
        request[DECISION] = decision
        if not decision.allowed:
            raise RateLimited(
                f"Too many submits for this API key: at most {burst} at once and "
                f"{request.app[SETTINGS].rate_limit_per_s:g} a second.",
                retry_after=decision.retry_after_s,
            )
    return await handler(request)


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the bucket's state on every response of a limited request."""
    decision = request.get(DECISION)
    if decision is not None:
        response.headers["RateLimit-Limit"] = str(decision.limit)
        response.headers["RateLimit-Remaining"] = str(decision.remaining)
        response.headers["RateLimit-Reset"] = str(decision.reset_s)
