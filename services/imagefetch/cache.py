"""The image cache: aiocache in process memory (bounded, least recently used first) or in Redis,
chosen by a setting, used through one code path.

Entries are images and remembered 404s, stored in a compact binary form (a JSON header, then the
bytes), never pickled: whoever can write to a shared Redis must not be able to run code here.
Keys are the SHA-256 of the normalized URL. A cache that fails or is slow is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections import OrderedDict
from typing import Any

from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import BaseSerializer
from yarl import URL

from services.imagefetch.config import Settings
from services.imagefetch.domain import FetchFailure, Image

log = logging.getLogger(__name__)

Entry = Image | FetchFailure

_MAGIC = b"RFI1"
_HEADER = struct.Struct(">4sI")


def cache_key(url: URL) -> str:
    """The key of a normalized URL."""
    return hashlib.sha256(str(url).encode()).hexdigest()


def ttl_for(cache_control: str, default_s: float) -> float:
    """How long to keep a response: the setting, shortened by `max-age`; 0 (not at all) on `no-store`."""
    directives: dict[str, str] = {}
    for part in cache_control.split(","):
        name, _, value = part.partition("=")
        directives[name.strip().lower()] = value.strip().strip('"')
    if "no-store" in directives:
        return 0.0
    max_age = directives.get("max-age", "")
    if max_age.isdigit():
        return min(default_s, float(max_age))
    return default_s


class EntrySerializer(BaseSerializer):  # type: ignore[misc]
    """Entries to bytes and back: magic, header length, JSON header, image bytes."""

    DEFAULT_ENCODING = None  # bytes in, bytes out

    def dumps(self, value: Entry) -> bytes:
        header: dict[str, Any]
        data = b""
        if isinstance(value, Image):
            header = {
                "kind": "image",
                "content_type": value.content_type,
                "width": value.width,
                "height": value.height,
                "final_url": value.final_url,
            }
            data = value.data
        else:
            header = {"kind": "failure", "reason": value.reason, "message": value.message}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        return _HEADER.pack(_MAGIC, len(encoded)) + encoded + data

    def loads(self, value: bytes | None) -> Entry | None:
        if value is None or len(value) < _HEADER.size:
            return None
        magic, length = _HEADER.unpack_from(value)
        if magic != _MAGIC:
            return None  # written by another version: a miss
        header = json.loads(value[_HEADER.size : _HEADER.size + length])
        if header["kind"] == "failure":
            return FetchFailure(header["reason"], header["message"])
        return Image(
            data=value[_HEADER.size + length :],
            content_type=header["content_type"],
            width=header["width"],
            height=header["height"],
            final_url=header["final_url"],
        )


class BoundedMemoryCache(SimpleMemoryCache):  # type: ignore[misc]
    """aiocache's memory cache with a bound on the bytes it holds (values are serialized bytes):
    the least recently used entries are dropped first; an entry larger than the bound is not kept."""

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cache: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self.max_bytes = max_bytes

    async def _get(self, key: str, encoding: str | None = "utf-8", _conn: Any = None) -> Any:
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    async def _set(
        self, key: str, value: bytes, ttl: float | None = None, _cas_token: Any = None, _conn: Any = None
    ) -> Any:
        if len(value) > self.max_bytes:
            await self._delete(key)
            return True
        result = await super()._set(key, value, ttl=ttl, _cas_token=_cas_token, _conn=_conn)
        if key in self._cache:
            self._cache.move_to_end(key)
        held = self.size_bytes
        while held > self.max_bytes:
            oldest = next(iter(self._cache))
            held -= len(self._cache[oldest])
            await self._delete(oldest)
        return result

    @property
    def size_bytes(self) -> int:
        """Bytes held now (entries past their TTL are already gone)."""
        return sum(len(value) for value in self._cache.values())


class ImageCache:
    """Images and remembered failures by cache key, in whichever backend the settings chose."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageCache:
        options: dict[str, Any] = {
            "serializer": EntrySerializer(),
            "namespace": f"{settings.cache_namespace}:",
            "timeout": settings.cache_timeout_s,
        }
        url = URL(settings.cache_url or "memory://")
        if url.scheme == "memory":
            return cls(BoundedMemoryCache(settings.cache_max_bytes, **options))
        backend = RedisCache(
            endpoint=url.host or "127.0.0.1",
            port=url.port or 6379,
            db=int(url.path.strip("/") or 0),
            password=url.password,
            ssl=url.scheme == "rediss",
            create_connection_timeout=settings.cache_timeout_s,
            **options,
        )
        return cls(backend)

    @property
    def kind(self) -> str:
        """`memory` or `redis`."""
        return "memory" if isinstance(self.backend, SimpleMemoryCache) else "redis"

    async def get(self, key: str) -> Entry | None:
        """The entry under `key`, or None (also when the cache fails)."""
        try:
            entry: Entry | None = await self.backend.get(key)
            return entry
        except Exception as exc:
            log.warning("cache read failed", extra={"cache": self.kind, "error": type(exc).__name__})
            return None

    async def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        """Keeps `entry` for `ttl_s` seconds; nothing when `ttl_s` is 0. Failures are logged, not raised."""
        if ttl_s <= 0:
            return
        try:
            # A float TTL keeps millisecond precision (PSETEX in Redis).
            await self.backend.set(key, entry, ttl=float(ttl_s))
        except Exception as exc:
            log.warning("cache write failed", extra={"cache": self.kind, "error": type(exc).__name__})

    async def close(self) -> None:
        await self.backend.close()
