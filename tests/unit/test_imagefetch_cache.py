"""The cache's rules (TTL from Cache-Control), its entry format, and the bound on the memory cache."""

from __future__ import annotations

import pytest
from yarl import URL

from services.imagefetch.cache import BoundedMemoryCache, EntrySerializer, ImageCache, cache_key, ttl_for
from services.imagefetch.config import Settings
from services.imagefetch.domain import FetchFailure, Image
from shared.http_headers import parse_retry_after


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        ("", 3600.0),
        ("public, max-age=60", 60.0),
        ("max-age=86400", 3600.0),  # never longer than the setting
        ("max-age=0", 0.0),
        ("no-store", 0.0),
        ("max-age=60, no-store", 0.0),
        ('MAX-AGE="30"', 30.0),
        ("max-age=soon", 3600.0),
    ],
)
def test_ttl_is_the_setting_shortened_by_max_age_and_zero_on_no_store(header: str, ttl: float) -> None:
    assert ttl_for(header, 3600.0) == ttl


def test_the_key_is_the_hash_of_the_normalized_url() -> None:
    assert cache_key(URL("http://example.com/a")) == cache_key(URL("http://example.com/a"))
    assert cache_key(URL("http://example.com/a")) != cache_key(URL("http://example.com/b"))
    assert len(cache_key(URL("http://example.com/a"))) == 64


def test_entries_survive_serialization() -> None:
    serializer = EntrySerializer()
    image = Image(data=b"\x89PNG...", content_type="image/png", width=3, height=2, final_url="http://x/y")
    assert serializer.loads(serializer.dumps(image)) == image
    failure = serializer.loads(serializer.dumps(FetchFailure("http_404", "gone")))
    assert isinstance(failure, FetchFailure)
    assert (failure.reason, failure.message) == ("http_404", "gone")
    assert serializer.loads(None) is None
    assert serializer.loads(b"something else entirely") is None


def _image(size: int, name: str) -> Image:
    return Image(data=b"x" * size, content_type="image/png", width=1, height=1, final_url=name)


async def test_the_memory_cache_drops_least_recently_used_entries_beyond_its_bound() -> None:
    cache = ImageCache.from_settings(Settings(cache_max_bytes=3_500))
    assert isinstance(cache.backend, BoundedMemoryCache)
    for name in ("a", "b", "c"):
        await cache.put(name, _image(1_000, name), 60)
    assert await cache.get("a") is not None  # now a is the most recently used
    await cache.put("d", _image(1_000, "d"), 60)
    assert await cache.get("b") is None
    assert {n for n in "acd" if await cache.get(n) is not None} == {"a", "c", "d"}
    assert cache.backend.size_bytes <= 3_500
    await cache.put("huge", _image(10_000, "huge"), 60)
    assert await cache.get("huge") is None
    assert await cache.get("a") is not None
    await cache.close()


async def test_nothing_is_stored_with_a_zero_ttl() -> None:
    cache = ImageCache.from_settings(Settings())
    await cache.put("k", _image(10, "k"), 0)
    assert await cache.get("k") is None
    await cache.close()


def test_retry_after_reads_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = parse_retry_after(later)
    assert wait is not None and 28 <= wait <= 30
