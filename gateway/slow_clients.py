"""Defences against clients that hold connections open without finishing their requests.

- The request-head deadline is aiohttp's keep-alive timer (set in `gateway.app.running`).
- `body_deadline_middleware`: a body must have arrived `body_timeout_s` after its head, else 408.
- `ConnectionCaps`: at most so many open connections per client address and in all. One over a cap
  is closed as soon as it is accepted, so that the process keeps descriptors for the clients it
  serves and its listening socket never runs out of them.
- `quiet_accept_errors`: should descriptors run out anyway, asyncio reports each failed accept to
  the loop's exception handler, a burst of up to a backlog's worth every second; this logs it at
  most once per `LOG_INTERVAL_S`, with how many were not logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Handler

from gateway.state import SETTINGS
from shared.errors import RequestTimeout

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
ACCEPT_ERROR = "socket.accept() out of system resource"
"""The message asyncio's accept loop gives the exception handler when descriptors run out."""


class _Throttle:
    """At most one log line per `interval_s`; counts the occasions not logged in between."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._next = 0.0
        self.suppressed = 0

    def due(self) -> int | None:
        """None when this occasion goes unlogged; else how many went unlogged before it."""
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self._interval_s
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


@web.middleware
async def body_deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost, so its clock starts when the head has been parsed. Past the deadline, reading what
    is left of the body raises RequestTimeout (408) wherever it is read, and the connection closes
    once the answer is out."""
    body = request.content
    if body.is_eof():  # no body, or all of it here already
        return await handler(request)
    timeout_s = request.app[SETTINGS].body_timeout_s
    late = RequestTimeout(f"The request body did not arrive within {timeout_s:g} s of its head.")
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, body, late)
    try:
        response = await handler(request)
    finally:
        timer.cancel()
        expired = body.exception() is late
        if expired:
            # After the response aiohttp reads on for up to 10 s ("lingering") so that a client
            # still sending gets to read its answer; not for a client this slow. That read ends
            # quietly on a TimeoutError (on our error it would log one), and aiohttp then closes.
            body.set_exception(TimeoutError())
    if expired:
        response.force_close()  # says `Connection: close`
    return response


def _expire(body: StreamReader, late: RequestTimeout) -> None:
    if not body.is_eof():
        body.set_exception(late)  # wakes a read waiting on the body at once


class ConnectionCaps:
    """Counts open connections, in all and per client IP address, and closes one over either cap as
    soon as it is accepted, before anything is read from it."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._open: dict[web.RequestHandler, str] = {}  # each admitted connection's client address
        self._by_client: Counter[str] = Counter()
        self._refusals = _Throttle()

    def watch(self, server: web.Server) -> None:
        """Has `server`, the protocol factory the site listens with, report its connections here.
        aiohttp has no connection cap; every RequestHandler tells its Server when its connection
        opens and closes, the one place all of them pass. The application runner builds that
        Server itself, hence its two hooks wrapped on the instance rather than a subclass."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(handler, transport)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None = None) -> None:
            self._release(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _admit(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else ""
        over_total = len(self._open) >= self.total
        if not over_total and self._by_client[client] < self.per_client:
            self._open[handler] = client
            self._by_client[client] += 1
            return
        # Closed unread and unanswered: an answer would wait on the client to read it.
        transport.abort()
        suppressed = self._refusals.due()
        if suppressed is not None:
            log.warning(
                "connection refused",
                extra={
                    "client": client,
                    "cap": "total" if over_total else "per_client",
                    "open": len(self._open),
                    "suppressed": suppressed,
                },
            )

    def _release(self, handler: web.RequestHandler) -> None:
        client = self._open.pop(handler, None)
        if client is None:  # refused: never counted
            return
        self._by_client[client] -= 1
        if not self._by_client[client]:
            del self._by_client[client]


@contextmanager
def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While inside, the loop's "out of system resource" accept errors are logged at most once per
    `LOG_INTERVAL_S` (with the count of those not logged); anything else goes where it went before."""
    previous = loop.get_exception_handler()
    throttle = _Throttle()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR:
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        suppressed = throttle.due()
        if suppressed is not None:
            error = str(context.get("exception"))
            log.error(ACCEPT_ERROR, extra={"error": error, "suppressed": suppressed})

    loop.set_exception_handler(handle)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
        if throttle.suppressed:
            log.error(ACCEPT_ERROR, extra={"suppressed": throttle.suppressed})
