"""Helpers that tests share: real servers standing in for misbehaving peers, and bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiohttp import web

TOKEN_ENV = {"RENDERFLOW_SERVICE_TOKEN": "a-service-token-for-settings-tests"}
"""What every process's `from_env` requires besides its own settings, for tests of those settings."""


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Returns once `predicate()` holds; TimeoutError after `timeout_s`. For state that announces no
    event of its own (counters of a server under test); checks every few milliseconds."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await asyncio.sleep(0.005)


async def serve_on_loopback(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serves `app` on 127.0.0.1 on `port` (0: a free one); returns the runner (the caller cleans
    it up) and the port. A handler ends when its client goes away, as with a real server."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    bound: int = runner.addresses[0][1]
    return runner, bound


@asynccontextmanager
async def serving_app(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port for the block (`serve_on_loopback`); its base URL."""
    runner, port = await serve_on_loopback(app)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
