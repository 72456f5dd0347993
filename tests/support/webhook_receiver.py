"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 that records every delivery it
is sent and answers as a test tells it to.

    async with Receiver() as receiver:       # receiver.url: http://127.0.0.1:PORT/hook
        receiver.answers = [503, 200]        # then 200 for ever
        await receiver.wait_for(lambda: len(receiver.received) == 2)

| attribute | effect |
| --- | --- |
| `answers` | statuses to answer, first to last (then `default`); `"hang"` holds the request open |
| `retry_after` | sent with a 429 or 503 answer |
| `redirect_to` | a 307 to this URL instead of an answer (the target counts its own hits) |
| `down()` / `up()` | closes the listening socket (connections refused) and opens it again, same port |
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from tests.support import serve_on_loopback


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """The server (see the module docstring)."""

    def __init__(self, default: int = 200) -> None:
        self.default = default
        self.answers: list[int | str] = []
        self.retry_after: str | None = None
        self.redirect_to: str | None = None
        self.received: list[Received] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()
        self._hanging = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Receiver:
        await self.up()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hanging.set()
        await self.down()

    async def up(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_on_loopback(app, self.port)

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Returns once `condition()` holds, re-checked at every request; TimeoutError after
        `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def release(self) -> None:
        """Ends the requests held open by `"hang"`."""
        self._hanging.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        self._changed.set()
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        answer = self.answers.pop(0) if self.answers else self.default
        if answer == "hang":
            await self._hanging.wait()
            answer = 200
        assert isinstance(answer, int)
        headers: dict[str, Any] = {}
        if answer in (429, 503) and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return web.Response(status=answer, text=f"answered {answer}", headers=headers)
