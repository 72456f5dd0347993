"""A small HTTP client of Renderflow for benchmarks: the stack to use (`RENDERFLOW_BENCH_URL` or one
started here), submits, and waiting for a render's end through its event stream."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.chaos.stack import StackConfig, running_stack

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Target:
    """A Renderflow gateway to measure, its API key, and the database it runs on ("" if unknown)."""

    url: str
    api_key: str
    database_url: str
    external: bool


@contextlib.asynccontextmanager
async def renderflow(config: StackConfig) -> AsyncIterator[Target]:
    """`RENDERFLOW_BENCH_URL` (+ `RENDERFLOW_BENCH_KEY`, `DATABASE_URL`) when set, else a stack
    started here with `config` and stopped on exit."""
    url = os.environ.get("RENDERFLOW_BENCH_URL")
    if url:
        yield Target(
            url.rstrip("/"),
            os.environ.get("RENDERFLOW_BENCH_KEY", ""),
            os.environ.get("DATABASE_URL", ""),
            True,
        )
        return
    with tempfile.TemporaryDirectory(prefix="renderflow-bench-") as workdir:
        async with running_stack(Path(workdir), config) as stack:
            yield Target(stack.url, stack.api_key, stack.database_url, False)


def session(target: Target, timeout_s: float = 120.0, limit: int = 0) -> aiohttp.ClientSession:
    """A session with the target's key (`limit` connections at most; 0: unlimited)."""
    return aiohttp.ClientSession(
        target.url,
        headers={"Authorization": f"Bearer {target.api_key}"},
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=limit),
    )


async def ensure_project(http: aiohttp.ClientSession, slug: str) -> None:
    async with http.post("/v1/projects", json={"slug": slug, "name": slug}) as answer:
        if answer.status not in (201, 409):
            raise RuntimeError(f"POST /v1/projects: {answer.status} {await answer.text()}")


def render_body(project: str, n: int, *, steps: int, size: int, reference_url: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "project": project,
        "kind": "image",
        "prompt": f"bench render {n}",
        "params": {"width": size, "height": size, "steps": steps, "seed": n},
    }
    if reference_url:
        body["reference"] = {"url": reference_url}
    return body


async def submit(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[str, float]:
    """POSTs one render; returns its id and the seconds to the 202."""
    started = time.perf_counter()
    async with http.post("/v1/renders", json=body) as answer:
        payload = await answer.json(content_type=None)
        if answer.status != 202:
            raise RuntimeError(f"POST /v1/renders: {answer.status} {payload}")
    return str(payload["id"]), time.perf_counter() - started


async def event_types(http: aiohttp.ClientSession, path: str) -> AsyncIterator[str]:
    """The type of each event of an SSE stream (`path`: a render's or a batch's events)."""
    async with http.get(path) as stream:
        if stream.status != 200:
            raise RuntimeError(f"GET {path}: {stream.status} {await stream.text()}")
        async for raw in stream.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                yield line.partition(":")[2].strip()


async def wait_terminal(http: aiohttp.ClientSession, render_id: str) -> tuple[str, float]:
    """Follows the render's events until its terminal one; returns its type and perf_counter time."""
    async for kind in event_types(http, f"/v1/renders/{render_id}/events"):
        if kind in TERMINAL:
            return kind, time.perf_counter()
    raise RuntimeError(f"the event stream of {render_id} ended without a terminal event")
