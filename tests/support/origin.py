"""A misbehaving HTTP origin for tests: a real aiohttp server on 127.0.0.1 with one route for each way
an origin goes wrong, counting the requests each path gets.

    async with Origin() as origin:
        url = origin.url("/hang-headers")

Routes (`{name}` only makes URLs distinct, e.g. per test):

| path | behaviour |
| --- | --- |
| `/image/{name}` | a small PNG; `?cache=<Cache-Control>` sets that header, `?big=1` serves a ~200 KiB PNG |
| `/gated/{name}` | the PNG once `origin.gate` is set |
| `/slow/{name}?delay=S` | the PNG after S seconds |
| `/hang-headers` | never sends headers |
| `/hang-body` | headers and 100 of 1000 announced bytes, then nothing |
| `/drip` | one byte a second |
| `/flaky/{name}` | 500 the first time, then the PNG |
| `/unavailable/{name}?after=N[&always=1]` | 503 with `Retry-After: N` once (or always), then the PNG |
| `/status/{code}` | that status, empty body |
| `/redirect/{n}/{name}` | a chain of n redirects (301 and 302 alternating) ending at the PNG |
| `/loop` | a redirect to itself |
| `/redirect-to?location=L` | a 302 to L |
| `/big?size=N[&length=1]` | N bytes, with Content-Length when `length=1`, else chunked |
| `/html-as-png` | an HTML page served as `image/png` |
| `/truncated.png` | the first half of a PNG, with a matching Content-Length |
| `/reset` | resets the connection (RST) without answering |
"""

from __future__ import annotations

import asyncio
import io
import random
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web
from PIL import Image as PilImage

from tests.support import serve_on_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def png_bytes(width: int = 8, height: int = 6, *, noise: bool = False, seed: int = 7) -> bytes:
    """A valid PNG; with `noise` its pixels are random, so it does not compress (for big bodies)."""
    image = PilImage.new("RGB", (width, height), (200, 30, 90))
    if noise:
        rng = random.Random(seed)
        image.frombytes(rng.randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Origin:
    """The server; `hits[path]` counts requests by path, `max_active` the most served at once."""

    def __init__(self) -> None:
        self.image = png_bytes()
        self.big_image = png_bytes(256, 256, noise=True)
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.gate = asyncio.Event()
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def requests(self) -> int:
        """Requests received, all paths together."""
        return sum(self.hits.values())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> Origin:
        app = web.Application(middlewares=[self._count])
        routes: dict[str, Handler] = {
            "/image/{name}": self._image,
            "/gated/{name}": self._gated,
            "/slow/{name}": self._slow,
            "/hang-headers": self._hang_headers,
            "/hang-body": self._hang_body,
            "/drip": self._drip,
            "/flaky/{name}": self._flaky,
            "/unavailable/{name}": self._unavailable,
            "/status/{code}": self._status,
            "/redirect/{n}/{name}": self._redirect,
            "/loop": self._loop,
            "/redirect-to": self._redirect_to,
            "/big": self._big,
            "/html-as-png": self._html,
            "/truncated.png": self._truncated,
            "/reset": self._reset,
        }
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def close(self) -> None:
        self._released.set()  # hanging handlers return now
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Origin:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await handler(request)
        finally:
            self.active -= 1

    def _png(self, request: web.Request) -> web.Response:
        body = self.big_image if request.query.get("big") else self.image
        headers = {"Cache-Control": request.query["cache"]} if "cache" in request.query else {}
        return web.Response(body=body, content_type="image/png", headers=headers)

    async def _image(self, request: web.Request) -> web.StreamResponse:
        return self._png(request)

    async def _gated(self, request: web.Request) -> web.StreamResponse:
        await self.gate.wait()
        return self._png(request)

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "0.1")))
        return self._png(request)

    async def _hang_headers(self, request: web.Request) -> web.StreamResponse:
        await self._released.wait()
        return web.Response(status=503)

    async def _hang_body(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": "1000"})
        await response.prepare(request)
        await response.write(self.big_image[:100])
        await self._released.wait()
        return response

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": "100"})
        await response.prepare(request)
        for byte in self.big_image[:100]:
            await response.write(bytes([byte]))
            try:
                await asyncio.wait_for(self._released.wait(), 1.0)
                break
            except TimeoutError:
                continue
        return response

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        if self.hits[request.path] == 1:
            return web.Response(status=500, text="try again")
        return self._png(request)

    async def _unavailable(self, request: web.Request) -> web.StreamResponse:
        if self.hits[request.path] == 1 or request.query.get("always"):
            return web.Response(status=503, headers={"Retry-After": request.query.get("after", "1")})
        return self._png(request)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.match_info["code"]))

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        left = int(request.match_info["n"])
        if left == 0:
            return self._png(request)
        status = 301 if left % 2 else 302
        location = f"/redirect/{left - 1}/{request.match_info['name']}"
        return web.Response(status=status, headers={"Location": location})

    async def _loop(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/loop"})

    async def _redirect_to(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": request.query["location"]})

    async def _big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        headers = {"Content-Type": "image/png"}
        if request.query.get("length"):
            headers["Content-Length"] = str(size)
        response = web.StreamResponse(headers=headers)
        if not request.query.get("length"):
            response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = self.big_image[:8192].ljust(8192, b"\0")
        sent = 0
        while sent < size:
            piece = chunk[: size - sent]
            await response.write(piece)
            sent += len(piece)
        return response

    async def _html(self, request: web.Request) -> web.StreamResponse:
        html = "<!doctype html><html><body><h1>Not an image</h1></body></html>"
        return web.Response(body=html.encode(), content_type="image/png")

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.big_image[: len(self.big_image) // 2], content_type="image/png")

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await self._released.wait()  # cancelled at once: the client is gone
        return web.Response()
