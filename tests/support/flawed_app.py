"""A small shop that is not Renderflow, with the flaws of the system Renderflow replaced, or
without them (`flawed=False`): the proof that `trace-report --review` finds such flaws in any
service that emits OpenTelemetry.

- `GET /items/{id}`: four independent queries on a real PostgreSQL, one after another (fixed: at
  once, on four connections);
- `GET /preview`: a reference image fetched from a slow origin while the client waits, with no
  timeout (fixed: fetched ahead, when the shop starts);
- `POST /batch`: eight renders, one after another (fixed: at once, at most eight at a time);
- `GET /broken`: fails every time, deep inside (fixed: works);
- `GET /search`: not a flaw, a tail to explain: one search in ten is fuzzy (`search.kind`), five
  times slower than an exact one.

Instrumented with the standard instrumentations (aiohttp server and client, psycopg), its spans
written as the OpenTelemetry Collector's file exporter writes them (OTLP/JSON lines).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shared.telemetry import JsonLinesSpanExporter
from tests.support import serving_app
from tests.support.origin import png_bytes

QUERY_S = 0.02
ORIGIN_DELAY_S = 0.1
RENDER_S = 0.02
SEARCH_S = 0.01
FUZZY = 5
BATCH = 8
QUERIES = ("item", "price", "stock", "reviews")


@dataclass
class Run:
    """What a run of the shop left: its spans, and how long each route took as its client saw it."""

    traces: Path
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def mean_ms(self, route: str) -> float:
        return 1000 * sum(self.seconds[route]) / len(self.seconds[route])


async def _origin_image(request: web.Request) -> web.Response:
    await asyncio.sleep(ORIGIN_DELAY_S)
    return web.Response(body=png_bytes(), content_type="image/png")


async def run_shop(database_url: str, traces: Path, *, flawed: bool, requests: int = 10) -> Run:
    """Starts the shop (and its slow image origin), sends `requests` to each route, one at a time,
    and returns once every span is written to `traces`."""
    provider = TracerProvider(resource=Resource({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(traces)))
    tracer = provider.get_tracer("shop")
    run = Run(traces)
    # The server instrumentation works only as installed (its middleware reads what `instrument`
    # sets up): every aiohttp application made meanwhile is traced, the shop's and its origin's.
    server_instrumentation = AioHttpServerInstrumentor()
    server_instrumentation.instrument(tracer_provider=provider)
    async with AsyncExitStack() as stack:
        stack.callback(server_instrumentation.uninstrument)
        origin_app = web.Application()
        origin_app.router.add_get("/image.png", _origin_image)
        origin = await stack.enter_async_context(serving_app(origin_app))
        connections = []
        for _ in QUERIES:
            conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
            stack.push_async_callback(conn.close)
            connections.append(PsycopgInstrumentor.instrument_connection(conn, tracer_provider=provider))
        session = await stack.enter_async_context(
            aiohttp.ClientSession(trace_configs=[create_trace_config(tracer_provider=provider)])
        )
        prefetched: list[bytes] = []

        async def query(conn: psycopg.AsyncConnection[object], what: str) -> None:
            await conn.execute(f"SELECT pg_sleep({QUERY_S}), '{what}'")

        async def item(request: web.Request) -> web.Response:
            if flawed:
                for what in QUERIES:
                    await query(connections[0], what)
            else:
                await asyncio.gather(*(query(c, what) for c, what in zip(connections, QUERIES, strict=True)))
            return web.json_response({"id": request.match_info["id"]})

        async def fetch_image() -> bytes:
            async with session.get(f"{origin}/image.png") as response:  # no timeout, as in the seed
                return await response.read()

        async def preview(request: web.Request) -> web.Response:
            image = await fetch_image() if flawed else prefetched[0]
            return web.Response(body=image, content_type="image/png")

        async def render_one(n: int) -> None:
            with tracer.start_as_current_span("render item", attributes={"item": n}):
                await asyncio.sleep(RENDER_S)

        async def batch(request: web.Request) -> web.Response:
            if flawed:
                for n in range(BATCH):
                    await render_one(n)
            else:
                await asyncio.gather(*(render_one(n) for n in range(BATCH)))  # BATCH at most at once
            return web.json_response({"rendered": BATCH})

        async def broken(request: web.Request) -> web.Response:
            with tracer.start_as_current_span("load theme"):
                themes: dict[str, str] = {"default": "light"}
                if flawed:
                    return web.json_response({"theme": themes[request.query.get("theme", "dark")]})
                return web.json_response({"theme": themes.get(request.query.get("theme", "dark"), "light")})

        async def search(request: web.Request) -> web.Response:
            kind = request.query.get("kind", "exact")
            with tracer.start_as_current_span("search", attributes={"search.kind": kind}):
                await asyncio.sleep(SEARCH_S * (FUZZY if kind == "fuzzy" else 1))
            return web.json_response({"kind": kind})

        app = web.Application()
        app.router.add_get("/items/{id}", item)
        app.router.add_get("/preview", preview)
        app.router.add_post("/batch", batch)
        app.router.add_get("/broken", broken)
        app.router.add_get("/search", search)
        shop = await stack.enter_async_context(serving_app(app))
        if not flawed:
            prefetched.append(await fetch_image())
        searches = [f"/search?kind={'fuzzy' if n % 10 == 9 else 'exact'}" for n in range(2 * requests)]
        async with aiohttp.ClientSession() as client:
            for route, method, paths in (
                ("GET /items/{id}", "GET", ["/items/7"] * requests),
                ("GET /preview", "GET", ["/preview"] * requests),
                ("POST /batch", "POST", ["/batch"] * requests),
                ("GET /broken", "GET", ["/broken"] * requests),
                ("GET /search", "GET", searches),
            ):
                run.seconds[route] = []
                for path in paths:
                    started = time.perf_counter()
                    async with client.request(method, shop + path) as response:
                        await response.read()
                    run.seconds[route].append(time.perf_counter() - started)
    provider.shutdown()
    return run
