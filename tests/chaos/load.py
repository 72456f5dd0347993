"""A steady load of render submissions over HTTP that records what every client saw: each
response's status, problem code, `Retry-After` and time, and every render that got a 202."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Which reference each submission carries, in turn: none, an optional one, a required one.
REFERENCE_CYCLE = ("none", "optional", "none", "required")


@dataclass(frozen=True)
class Response:
    """What one client saw for one submit (`status` 0: no HTTP answer at all)."""

    sent: float
    latency_s: float
    status: int
    code: str
    retry_after: str | None = None
    render_id: str | None = None
    reference: str = "none"

    @property
    def error(self) -> bool:
        return self.status != 202

    @property
    def typed(self) -> bool:
        """An error a client can act on: 429 or 503/504 with Retry-After and a problem code."""
        if self.status == 429 or self.status in (503, 504):
            return self.retry_after is not None and bool(self.code)
        return False


@dataclass(frozen=True)
class Accepted:
    """A render the stack promised to run (it answered 202)."""

    render_id: str
    sent: float
    reference: str


@dataclass
class Load:
    """Submits `rate` renders a second to the gateway at `url` until stopped."""

    url: str
    api_key: str
    project: str
    reference_url: Callable[[int], str]
    rate: float = 4.0
    steps: int = 10
    size: int = 64
    timeout_s: float = 20.0
    max_in_flight: int = 64
    clock: Callable[[], float] = time.monotonic
    responses: list[Response] = field(default_factory=list)
    accepted: dict[str, Accepted] = field(default_factory=dict)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def body(self, n: int, reference: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "project": self.project,
            "kind": "image",
            "prompt": f"chaos render {n}",
            "params": {"width": self.size, "height": self.size, "steps": self.steps, "seed": n},
        }
        if reference != "none":
            body["reference"] = {"url": self.reference_url(n), "required": reference == "required"}
        return body

    async def submit(self, http: aiohttp.ClientSession, n: int) -> Response:
        reference = REFERENCE_CYCLE[n % len(REFERENCE_CYCLE)]
        sent = self.clock()
        try:
            async with http.post("/v1/renders", json=self.body(n, reference)) as answer:
                payload = await answer.json(content_type=None)
                code = str(payload.get("code", "")) if isinstance(payload, dict) else ""
                render_id = payload.get("id") if answer.status == 202 else None
                response = Response(
                    sent,
                    self.clock() - sent,
                    answer.status,
                    code,
                    answer.headers.get("Retry-After"),
                    render_id,
                    reference,
                )
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # No typed answer at all: a reset, a refused connection, a timeout, a body not JSON.
            response = Response(sent, self.clock() - sent, 0, type(exc).__name__, reference=reference)
        self.responses.append(response)
        if response.render_id:
            self.accepted[response.render_id] = Accepted(response.render_id, sent, reference)
        return response

    async def run(self) -> None:
        """Submits at a steady pace (a slow answer does not slow the pace) until `stop()`."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limit = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(n: int) -> None:
            async with limit:
                await self.submit(http, n)

        async with aiohttp.ClientSession(self.url, headers=headers, timeout=timeout) as http:
            start = self.clock()
            for n in itertools.count():
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at = start + (n + 1) / self.rate
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), max(0.0, next_at - self.clock()))
                if self._stopped.is_set():
                    break
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopped.set()
