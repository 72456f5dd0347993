"""The in-process token bucket: burst, refill at the rate, what the RateLimit headers say, and when
a refused caller may retry."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.limits import Decision, MemoryBuckets, RedisBuckets, open_buckets
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_full_bucket_allows_the_burst_then_refuses() -> None:
    buckets = MemoryBuckets(rate=2.0, burst=3, clock=Clock())
    answers = [await buckets.take("key", 1) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert [a.remaining for a in answers] == [2, 1, 0, 0]
    assert answers[0].limit == 3
    assert answers[2].reset_s == 2  # 3 tokens at 2 a second: full again in 1.5 s, said as 2
    assert answers[3].retry_after_s == pytest.approx(0.5)


async def test_tokens_come_back_at_the_rate_and_never_beyond_the_burst() -> None:
    clock = Clock()
    buckets = MemoryBuckets(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        await buckets.take("key", 1)
    clock.now += 1.0  # two tokens back
    assert (await buckets.take("key", 2)).allowed
    assert not (await buckets.take("key", 1)).allowed
    clock.now += 60.0
    full = await buckets.take("key", 1)
    assert (full.allowed, full.remaining) == (True, 2)


async def test_keys_have_their_own_buckets() -> None:
    buckets = MemoryBuckets(rate=1.0, burst=1, clock=Clock())
    assert (await buckets.take("alice", 1)).allowed
    assert not (await buckets.take("alice", 1)).allowed
    assert (await buckets.take("bob", 1)).allowed


async def test_a_refused_request_takes_nothing() -> None:
    clock = Clock()
    buckets = MemoryBuckets(rate=1.0, burst=4, clock=clock)
    await buckets.take("key", 3)
    refused = await buckets.take("key", 2)
    assert (refused.allowed, refused.remaining) == (False, 1)
    assert refused.retry_after_s == pytest.approx(1.0)
    assert (await buckets.take("key", 1)).allowed


def test_decision_rounds_for_headers() -> None:
    decision = Decision.of(True, 0.4, 1, rate=0.5, burst=10)
    assert (decision.remaining, decision.reset_s, decision.retry_after_s) == (0, 20, 0.0)


async def test_settings_choose_the_buckets() -> None:
    assert open_buckets(Settings(rate_limit_per_s=0)) is None
    assert open_buckets(Settings(rate_limit_burst=0)) is None
    assert isinstance(open_buckets(Settings()), MemoryBuckets)
    shared = open_buckets(Settings(cache_url="redis://127.0.0.1:1/0"))
    assert isinstance(shared, RedisBuckets)
    await shared.close()


def test_cache_url_from_env() -> None:
    assert Settings.from_env(Env({"RENDERFLOW_CACHE_URL": "memory://", **TOKEN_ENV})).cache_url is None
    url = "redis://:pw@cache:6379/1"
    assert Settings.from_env(Env({"RENDERFLOW_CACHE_URL": url, **TOKEN_ENV})).cache_url == url
    with pytest.raises(ConfigError, match="RENDERFLOW_CACHE_URL") as caught:
        Settings.from_env(Env({"RENDERFLOW_CACHE_URL": "memcached://:hunter2@cache:11211"}))
    assert "hunter2" not in str(caught.value)
