"""Best-effort prefetch of reference images at submit time, so that the worker usually finds
them in the image-fetch service's cache. The server's gRPC edge towards imagefetch.

Nothing waits for a prefetch: Submit starts it and returns, and its spans are a trace of their own,
linked to the submit's, so that the submit's trace lasts as long as its client waited. Prefetches are
bounded (at most
`max_pending` in flight or waiting; beyond that new ones are dropped), short (their own deadline),
and their failures are only logged: the worker's own fetch decides what happens to the render.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from shared.errors import RenderflowError
from shared.rpc_errors import rpc_errors

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


class Prefetcher:
    """Fires image fetches and forgets them."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout_s: float, concurrency: int, max_pending: int = 256
    ) -> None:
        self._stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._max_pending = max_pending
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, url: str) -> None:
        """Starts fetching `url` in the background (or drops it when too many are pending)."""
        if len(self._tasks) >= self._max_pending:
            log.warning("prefetch dropped: too many pending", extra={"pending": len(self._tasks)})
            return
        submitted = trace.get_current_span().get_span_context()
        task = asyncio.create_task(self._fetch(url, submitted), name="reference-prefetch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancels the prefetches still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _fetch(self, url: str, submitted: SpanContext) -> None:
        # The host only: a URL may carry credentials or signed query strings.
        host = urlsplit(url).hostname or ""
        request = imagefetch_pb2.FetchRequest(url=url, deadline_ms=int(self._timeout_s * 1000))
        links = [Link(submitted)] if submitted.is_valid else []
        try:
            async with self._slots:
                with (
                    _tracer.start_as_current_span("reference_prefetch", context=Context(), links=links),
                    rpc_errors(),
                ):
                    result = await self._stub.Fetch(request, timeout=self._timeout_s + 0.5)
        except RenderflowError as exc:
            log.info("prefetch failed", extra={"host": host, "error": exc.code})
            return
        if result.WhichOneof("outcome") == "failure":
            log.info("prefetch failed", extra={"host": host, "reason": result.failure.reason})
