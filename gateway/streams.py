"""Every event stream open in this gateway (Server-Sent Events and WebSocket), by API key: at most
`max_per_key` at once for each key, and the means to end them — a key's when it is revoked, a
user's when the user is deleted, all of them on shutdown.

Streams last as long as a client listens, so without a cap one tenant's thousands of idle
streams slow every other tenant's requests; and a stream authenticated once would otherwise go on
delivering after its key was revoked. The cap is per gateway process."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from aiohttp import web
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from gateway.auth import Principal
from shared.errors import QuotaExceeded
from shared.metrics import SCOPE

log = logging.getLogger(__name__)


class Ending(Enum):
    """Why the gateway ends a stream: the client acts differently on each."""

    REVOKED = "revoked"
    """Its API key was revoked or its user deleted: reconnecting will not be authorised."""
    SHUTDOWN = "shutdown"
    """This gateway is stopping: resume elsewhere with the last event id."""


EndStream = Callable[[Ending], object]
"""Ends one stream; called on the event loop, must not block."""


@dataclass
class _Stream:
    caller: Principal
    end: EndStream = field(compare=False)


class OpenStreams:
    """The registry of open streams of one gateway."""

    def __init__(self, max_per_key: int) -> None:
        self._max_per_key = max_per_key
        self._by_key: dict[str, list[_Stream]] = {}
        _registries.add(self)

    @property
    def count(self) -> int:
        """Streams open now (SSE and WebSocket)."""
        return sum(len(streams) for streams in self._by_key.values())

    @contextlib.contextmanager
    def opened(self, caller: Principal, end: EndStream) -> Iterator[None]:
        """Holds a place for one stream of `caller` while the block runs; QuotaExceeded (429) when
        the key already has `max_per_key` open. `end` is how the stream is ended early."""
        streams = self._by_key.setdefault(caller.key_id, [])
        if len(streams) >= self._max_per_key:
            raise QuotaExceeded(
                f"Too many open event streams for this API key: at most {self._max_per_key} at once."
                " Close some, or follow a batch's renders with its one stream.",
                retry_after=1.0,
            )
        stream = _Stream(caller, end)
        streams.append(stream)
        try:
            yield
        finally:
            streams.remove(stream)
            if not streams:
                del self._by_key[caller.key_id]

    def end(self, *, key_id: str | None = None, user_id: str | None = None) -> int:
        """Ends the streams of an API key, or of every key of a user, as revoked; says how many."""
        doomed = [
            stream
            for streams in self._by_key.values()
            for stream in streams
            if stream.caller.key_id == key_id or stream.caller.user_id == user_id
        ]
        for stream in doomed:
            stream.end(Ending.REVOKED)
        if doomed:
            log.info("event streams ended: access revoked", extra={"streams": len(doomed)})
        return len(doomed)

    def end_all(self) -> None:
        """Ends every stream, for shutdown; clients resume on another gateway."""
        for streams in list(self._by_key.values()):
            for stream in list(streams):
                stream.end(Ending.SHUTDOWN)


OPEN_STREAMS = web.AppKey("open_streams", OpenStreams)


_registries: weakref.WeakSet[OpenStreams] = weakref.WeakSet()


def _open_streams(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(sum(registry.count for registry in list(_registries)))


metrics.get_meter(f"{SCOPE}.gateway").create_observable_gauge(
    "renderflow.gateway.streams.open",
    [_open_streams],
    unit="{stream}",
    description="Event streams (SSE and WebSocket) open on this gateway",
)
