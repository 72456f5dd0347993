"""The machine's ceilings for the submit path, measured with the same client as the submit benchmark:

- bare HTTP: an aiohttp handler that reads the body and answers JSON, nothing else;
- bare chain: an aiohttp handler -> one grpc.aio call -> a gRPC handler doing one INSERT + COMMIT on
  PostgreSQL (the same server build and settings as the stack's) -> the answer.

Each server runs in a process of its own, as Renderflow's do; figures are medians over `--reps`.

    .venv/bin/python -m tests.bench.bench_ceilings [--clients 1,16,64] [--seconds 3] [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from shared.lifecycle import wait_for_shutdown_signal
from tests.bench.figures import json_argument, median, write_json
from tests.bench.loadgen import closed_loop
from tools.embedded_pg.server import EmbeddedPostgres

METHOD = "/bench.Chain/Insert"
BODY = json.dumps(
    {"project": "bench", "kind": "image", "prompt": "a lighthouse", "params": {"width": 64, "height": 64}}
).encode()
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS ceiling;
CREATE TABLE IF NOT EXISTS ceiling.inserts (
    id bigserial PRIMARY KEY, body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now()
);
"""


# The servers (each runs in its own process: `python -m tests.bench.bench_ceilings serve-...`).


async def _serve_http(handler: Any, cleanup: Any = None) -> None:
    app = web.Application()
    app.router.add_post("/submit", handler)
    if cleanup is not None:
        app.cleanup_ctx.append(cleanup)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    await wait_for_shutdown_signal()
    await runner.cleanup()


async def serve_bare() -> None:
    async def submit(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "0", "status": "queued"}, status=202)

    await _serve_http(submit)


async def serve_chain_http(grpc_addr: str) -> None:
    channel = grpc.aio.insecure_channel(grpc_addr)
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)

    async def submit(request: web.Request) -> web.Response:
        answer = await call(await request.read(), timeout=5.0)
        return web.json_response({"id": bytes(answer).decode(), "status": "queued"}, status=202)

    async def close_channel(app: web.Application) -> AsyncIterator[None]:
        yield
        await channel.close()

    await _serve_http(submit, close_channel)


async def serve_chain_grpc(database_url: str) -> None:
    pool = AsyncConnectionPool(database_url, min_size=10, max_size=10, open=False)
    await pool.open(wait=True)

    async def insert(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        async with pool.connection() as conn, conn.transaction():
            cur = await conn.execute("INSERT INTO ceiling.inserts (body) VALUES (%s) RETURNING id", [body])
            row = await cur.fetchone()
        assert row is not None
        return str(row[0]).encode()

    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(insert)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Chain", {"Insert": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on {port}", flush=True)
    await wait_for_shutdown_signal()
    await server.stop(1.0)
    await pool.close()


# The measurement.


@contextlib.asynccontextmanager
async def server_process(*args: str) -> AsyncIterator[int]:
    """One of the servers above in a child process; yields its port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_ceilings", *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line.startswith(b"listening on "):
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        yield int(line.split()[-1])
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _post(http: aiohttp.ClientSession, n: int) -> int:
    async with http.post("/submit", data=BODY, headers={"Content-Type": "application/json"}) as answer:
        await answer.read()
        return answer.status


async def measure(port: int, clients: list[int], seconds: float, reps: int) -> dict[str, Any]:
    """Median over `reps` of each figure at each client count."""
    figures: dict[str, Any] = {}
    for count in clients:
        runs = [
            (await closed_loop(f"http://127.0.0.1:{port}", _post, count, seconds)).as_json()
            for _ in range(reps)
        ]
        figures[str(count)] = {
            "clients": count,
            "rps": round(median([r["rps"] for r in runs]), 1),
            "p50_ms": round(median([r["p50_ms"] for r in runs]), 3),
            "p99_ms": round(median([r["p99_ms"] for r in runs]), 3),
            "errors": sum(r["errors"] for r in runs),
            "reps_rps": [r["rps"] for r in runs],
        }
    return figures


@contextlib.asynccontextmanager
async def database(workdir: Path) -> AsyncIterator[str]:
    """DATABASE_URL when set, else an embedded server with the stack's settings (durable)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    postgres = EmbeddedPostgres(workdir / "pg")
    try:
        yield await asyncio.to_thread(postgres.start)
    finally:
        await asyncio.to_thread(postgres.stop)


async def bench(clients: list[int], seconds: float, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="renderflow-ceilings-") as tmp:
        async with database(Path(tmp)) as url:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(SCHEMA.encode())
            async with server_process("serve-bare") as port:
                bare = await measure(port, clients, seconds, reps)
            async with (
                server_process("serve-chain-grpc", url) as grpc_port,
                server_process("serve-chain-http", f"127.0.0.1:{grpc_port}") as port,
            ):
                chain = await measure(port, clients, seconds, reps)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute("DROP SCHEMA ceiling CASCADE")
    return {
        "scenario": "ceilings",
        "settings": {"clients": clients, "seconds": seconds, "reps": reps},
        "bare_http": bare,
        "bare_chain": chain,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("serve-"):
        role, rest = sys.argv[1], sys.argv[2:]
        servers = {
            "serve-bare": lambda: serve_bare(),
            "serve-chain-http": lambda: serve_chain_http(rest[0]),
            "serve-chain-grpc": lambda: serve_chain_grpc(rest[0]),
        }
        asyncio.run(servers[role]())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--reps", type=int, default=3)
    json_argument(parser)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    result = asyncio.run(bench(clients, args.seconds, args.reps))
    for name in ("bare_http", "bare_chain"):
        for figures in result[name].values():
            print(
                f"{name:<10} {figures['clients']:>3} clients: {figures['rps']:>8.1f} req/s, "
                f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms, errors {figures['errors']}"
            )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
