"""The cache (memory and a real Redis, same tests) and single-flight: repeated fetches are free,
expiry and no-store are obeyed, 404s are remembered briefly, and 100 concurrent fetches of one URL
reach the origin once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest

from services.imagefetch.config import Settings
from services.imagefetch.domain import FetchOrder
from services.imagefetch.service import ImageService, open_service
from shared.url_guard import parse_allow_list
from tests.conftest import free_port
from tests.support import eventually
from tests.support.origin import Origin

OpenService = Callable[..., Awaitable[ImageService]]


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    """Each cache test runs against both backends."""
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as origin:
        yield origin


@pytest.fixture
async def open_fetcher(cache_url: str) -> AsyncIterator[OpenService]:
    """Opens services sharing one cache (a fresh namespace per test); all closed after the test."""
    settings = Settings(
        allow=parse_allow_list(["127.0.0.1"]),
        deadline_s=2.0,
        cache_url=cache_url,
        cache_namespace=f"test-{uuid.uuid4().hex[:8]}",
        cache_negative_ttl_s=0.3,
    )
    async with AsyncExitStack() as stack:

        async def open_(**overrides: Any) -> ImageService:
            return await stack.enter_async_context(open_service(replace(settings, **overrides)))

        yield open_


async def test_a_repeated_fetch_is_a_cache_hit(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    url = origin.url("/image/hit")
    first = await service.fetch(FetchOrder(url))
    second = await service.fetch(FetchOrder(url))
    assert not first.cache_hit and second.cache_hit
    assert second.image == first.image and second.image is not None
    assert second.attempts == 0
    assert origin.hits["/image/hit"] == 1


async def test_the_key_is_the_normalized_url(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    await service.fetch(FetchOrder(origin.url("/image/norm")))
    same = await service.fetch(FetchOrder(f"HTTP://127.0.0.1:{origin.port}/image/norm#fragment"))
    assert same.cache_hit


async def test_no_cache_skips_reading_but_still_stores(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    url = origin.url("/image/fresh")
    await service.fetch(FetchOrder(url))
    fresh = await service.fetch(FetchOrder(url, no_cache=True))
    assert not fresh.cache_hit and fresh.image is not None
    assert origin.hits["/image/fresh"] == 2
    assert (await service.fetch(FetchOrder(url))).cache_hit


async def test_max_age_shortens_the_ttl_and_entries_expire(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(cache_ttl_s=3600)
    url = origin.url("/image/expiring?cache=max-age%3D1")
    await service.fetch(FetchOrder(url))
    assert (await service.fetch(FetchOrder(url))).cache_hit
    await asyncio.sleep(1.1)
    expired = await service.fetch(FetchOrder(url))
    assert not expired.cache_hit and expired.image is not None
    assert origin.hits["/image/expiring"] == 2


async def test_the_ttl_setting_expires_entries(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(cache_ttl_s=0.3)
    url = origin.url("/image/short")
    await service.fetch(FetchOrder(url))
    assert (await service.fetch(FetchOrder(url))).cache_hit
    await asyncio.sleep(0.4)
    assert not (await service.fetch(FetchOrder(url))).cache_hit


@pytest.mark.parametrize("header", ["no-store", "max-age%3D0"])
async def test_no_store_is_not_cached(origin: Origin, open_fetcher: OpenService, header: str) -> None:
    service = await open_fetcher()
    url = origin.url(f"/image/nostore?cache={header}")
    outcomes = [await service.fetch(FetchOrder(url)) for _ in range(2)]
    assert all(o.image is not None and not o.cache_hit for o in outcomes)
    assert origin.hits["/image/nostore"] == 2


async def test_a_404_is_remembered_briefly(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    url = origin.url("/status/404")
    first = await service.fetch(FetchOrder(url))
    again = await service.fetch(FetchOrder(url))
    assert again.cache_hit and again.failure is not None and again.failure.reason == "http_404"
    assert origin.hits["/status/404"] == 1
    await asyncio.sleep(0.4)  # the negative TTL is 0.3 s
    later = await service.fetch(FetchOrder(url))
    assert first.failure is not None and not later.cache_hit
    assert origin.hits["/status/404"] == 2


async def test_other_failures_are_not_cached(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    for _ in range(2):
        outcome = await service.fetch(FetchOrder(origin.url("/html-as-png")))
        assert outcome.failure is not None and not outcome.cache_hit
    assert origin.hits["/html-as-png"] == 2


async def test_100_concurrent_fetches_reach_the_origin_once(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    url = origin.url("/gated/flight?big=1")
    fetches = [asyncio.create_task(service.fetch(FetchOrder(url))) for _ in range(100)]
    await eventually(lambda: service.waiting(url) == 100)
    origin.gate.set()
    outcomes = await asyncio.gather(*fetches)
    assert origin.hits["/gated/flight"] == 1
    assert all(o.image is not None and o.image.data == origin.big_image for o in outcomes)
    assert not any(o.cache_hit for o in outcomes)  # they shared the fetch, not the cache


async def test_a_caller_giving_up_does_not_stop_the_shared_fetch(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    url = origin.url("/gated/patience")
    impatient = asyncio.create_task(service.fetch(FetchOrder(url, deadline_s=0.2)))
    patient = asyncio.create_task(service.fetch(FetchOrder(url)))
    gave_up = await impatient
    assert gave_up.failure is not None and gave_up.failure.reason == "timeout"
    origin.gate.set()
    assert (await patient).image is not None
    assert origin.hits["/gated/patience"] == 1


async def test_redis_is_shared_by_service_instances(origin: Origin, redis_url: str) -> None:
    settings = Settings(
        allow=parse_allow_list(["127.0.0.1"]),
        cache_url=redis_url,
        cache_namespace=f"shared-{uuid.uuid4().hex[:8]}",
    )
    async with open_service(settings) as first, open_service(settings) as second:
        url = origin.url("/image/shared")
        await first.fetch(FetchOrder(url))
        from_other = await second.fetch(FetchOrder(url))
    assert from_other.cache_hit and from_other.image is not None
    assert origin.hits["/image/shared"] == 1


async def test_an_unreachable_cache_is_only_a_miss(origin: Origin) -> None:
    settings = Settings(allow=parse_allow_list(["127.0.0.1"]), cache_url=f"redis://127.0.0.1:{free_port()}/0")
    async with open_service(settings) as service:
        url = origin.url("/image/nocache")
        outcomes = [await service.fetch(FetchOrder(url)) for _ in range(2)]
    assert all(o.image is not None and not o.cache_hit for o in outcomes)
