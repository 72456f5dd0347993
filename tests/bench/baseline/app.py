"""The seed's design, small and faithful, as the benchmark's baseline: one aiohttp process that does
everything inside the request, the way production did.

`POST /render`: fetch the reference image in the request (aiohttp, no timeout at all), four
sequential queries (project, chain, position, rules), the generation awaited inside the request
(the same procedural backend and step latency as Renderflow's workers), the output written, one
INSERT; then 200 with the result. `POST /render/batch` does its items one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend

SCHEMA_SQL = Path(__file__).with_name("schema.sql")


@dataclass(frozen=True)
class BaselineSettings:
    """The baseline server; `step_ms` as Renderflow's RENDERFLOW_BACKEND_PROCEDURAL_STEP_MS."""

    database_url: str
    artifact_dir: Path
    step_ms: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    pool_max: int = 10


@dataclass
class _State:
    pool: AsyncConnectionPool
    http: aiohttp.ClientSession
    backend: ProceduralBackend
    artifact_dir: Path


STATE = web.AppKey("state", _State)


async def prepare(database_url: str, project: str = "bench") -> None:
    """The schema, and a project with its default chain and two active rules (idempotent)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(SCHEMA_SQL.read_text().encode())
        cur = await conn.execute(
            "INSERT INTO baseline.projects (slug, name) VALUES (%s, %s) ON CONFLICT (slug) DO NOTHING"
            " RETURNING id",
            [project, project],
        )
        row = await cur.fetchone()
        if row is not None:
            await conn.execute(
                "INSERT INTO baseline.chains (project_id, name, is_default) VALUES (%s, 'default', true)",
                [row[0]],
            )
            for text in ("warm light", "no text in the image"):
                await conn.execute(
                    "INSERT INTO baseline.rules (project_id, text) VALUES (%s, %s)", [row[0], text]
                )


async def _one(conn: psycopg.AsyncConnection[Any], query: str, params: list[Any]) -> tuple[Any, ...]:
    cur = await conn.execute(query.encode(), params)
    row = await cur.fetchone()
    if row is None:
        raise web.HTTPNotFound(text="not found")
    return tuple(row)


async def render_one(state: _State, item: dict[str, Any]) -> dict[str, Any]:
    """One render, start to end, inside the caller's request."""
    started = time.perf_counter()
    reference: bytes | None = None
    url = (item.get("reference") or {}).get("url")
    if url:
        # As production did: in the request, and no timeout (the session has none either).
        async with state.http.get(url) as answer:
            reference = await answer.read() if answer.status == 200 else None
    async with state.pool.connection() as conn:
        await conn.set_autocommit(True)
        # Four round trips, one after another, as the seed's request handler made them.
        (project_id,) = await _one(
            conn, "SELECT id FROM baseline.projects WHERE slug = %s", [item["project"]]
        )
        (chain_id,) = await _one(
            conn,
            "SELECT id FROM baseline.chains WHERE project_id = %s AND is_default",
            [project_id],
        )
        (position,) = await _one(
            conn,
            "SELECT coalesce(max(position), 0) + 1 FROM baseline.renders WHERE chain_id = %s",
            [chain_id],
        )
        cur = await conn.execute(
            "SELECT text FROM baseline.rules WHERE project_id = %s AND active ORDER BY id", [project_id]
        )
        rules = tuple(row[0] for row in await cur.fetchall())
    params = item.get("params") or {}
    job = GenerationInput(
        render_id=secrets.token_hex(8),
        kind="image",
        prompt=item["prompt"],
        negative_prompt="",
        width=int(params.get("width", 512)),
        height=int(params.get("height", 512)),
        steps=int(params.get("steps", 20)),
        seed=int(params.get("seed", 0)),
        rules=rules,
        reference=reference,
    )

    async def ignore(step: int, total: int) -> None:
        return None

    artifact = await state.backend.generate(job, ignore)
    path = state.artifact_dir / f"{job.render_id}.png"
    await asyncio.to_thread(path.write_bytes, artifact.data)
    async with state.pool.connection() as conn:
        (render_id,) = await _one(
            conn,
            "INSERT INTO baseline.renders (chain_id, position, prompt, output_path) VALUES (%s, %s, %s, %s)"
            " RETURNING id",
            [chain_id, position, item["prompt"], str(path)],
        )
    return {
        "id": render_id,
        "position": position,
        "bytes": len(artifact.data),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
    }


async def post_render(request: web.Request) -> web.Response:
    return web.json_response(await render_one(request.app[STATE], await request.json()))


async def post_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    items = (await request.json())["items"]
    results = []
    for item in items:  # one after another, as the seed did
        results.append(await render_one(state, item))
    return web.json_response({"renders": results})


def create_app(settings: BaselineSettings) -> web.Application:
    """The baseline application, not yet started."""
    app = web.Application()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(settings.database_url, min_size=2, max_size=settings.pool_max, open=False)
        await pool.open(wait=True)
        settings.artifact_dir.mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            app[STATE] = _State(pool, http, ProceduralBackend(settings.step_ms), settings.artifact_dir)
            try:
                yield
            finally:
                await pool.close()

    app.cleanup_ctx.append(resources)
    app.router.add_post("/render", post_render)
    app.router.add_post("/render/batch", post_batch)
    return app


@contextlib.asynccontextmanager
async def running(settings: BaselineSettings) -> AsyncIterator[int]:
    """Serves the baseline (schema prepared first); yields the bound port."""
    await prepare(settings.database_url)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()
