"""The peer: procrastinate (a well-known PostgreSQL job queue) doing no-op jobs on the same
PostgreSQL, with 1 and 2 worker processes of 4 concurrent jobs each (as Renderflow's workers run);
jobs per second from the first defer to the last job done, median over `--reps`.

With `--renderflow`, Renderflow's no-op renders end to end over HTTP (submit -> succeeded, zero step
latency) are measured in the same run with the same worker counts, for the ratio.

    .venv/bin/python -m tests.bench.bench_procrastinate [--jobs 512] [--reps 3] [--renderflow] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import procrastinate
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.bench.bench_ceilings import database
from tests.bench.figures import json_argument, median, ratio, write_json

CONCURRENCY = 4
BATCH = 64


def make_app(url: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="noop", queue="bench")
    async def noop(n: int) -> None:
        return None

    return app


async def run_worker(url: str) -> None:
    """One worker process (`python -m tests.bench.bench_procrastinate worker URL`)."""
    app = make_app(url)
    async with app.open_async():
        print("ready", flush=True)
        await app.run_worker_async(queues=["bench"], concurrency=CONCURRENCY, wait=True)


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """A database of its own (procrastinate's tables live in `public`), dropped afterwards."""
    name = f"bench_procrastinate_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.asynccontextmanager
async def workers(url: str, count: int) -> AsyncIterator[None]:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench.bench_procrastinate",
            "worker",
            url,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(count)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise RuntimeError(f"a procrastinate worker did not start: {line!r}")
        await asyncio.sleep(0.3)  # LISTEN established
        yield
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def jobs_per_second(url: str, app: procrastinate.App, jobs: int) -> float:
    """Defers `jobs` no-op jobs in batches while the workers run; jobs/s until all are done."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DELETE FROM procrastinate_jobs")
        started = time.perf_counter()
        noop = app.tasks["noop"]
        for offset in range(0, jobs, BATCH):
            batch: list[dict[str, Any]] = [{"n": n} for n in range(offset, min(jobs, offset + BATCH))]
            await noop.batch_defer_async(*batch)
        while True:
            cur = await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
            row = await cur.fetchone()
            if row is not None and row[0] >= jobs:
                return jobs / (time.perf_counter() - started)
            await asyncio.sleep(0.01)


async def procrastinate_rates(server_url: str, jobs: int, reps: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with scratch_database(server_url) as url:
        app = make_app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for count in (1, 2):
                async with workers(url, count):
                    await jobs_per_second(url, app, BATCH)  # warm-up
                    rates = [await jobs_per_second(url, app, jobs) for _ in range(reps)]
                figures[str(count)] = {
                    "jobs_per_s": round(median(rates), 1),
                    "reps": [round(r, 1) for r in rates],
                }
    return figures


async def renderflow_rates(jobs: int, reps: int) -> dict[str, Any]:
    """Renderflow's no-op renders end to end over HTTP, with 1 and then 2 worker processes."""
    from tests.bench.rfclient import ensure_project, render_body, renderflow, session, submit, wait_terminal
    from tests.chaos.stack import StackConfig

    figures: dict[str, Any] = {}
    for count in (1, 2):
        config = StackConfig.product_defaults(0.0, workers=count)
        async with renderflow(config) as target, session(target, limit=64) as http:
            await ensure_project(http, "queue")

            async def one_run(total: int, tag: str) -> float:
                started = time.perf_counter()
                limit = asyncio.Semaphore(64)

                async def render(n: int) -> None:
                    async with limit:
                        render_id, _ = await submit(http, render_body("queue", n, steps=1, size=64))
                    kind, _ = await wait_terminal(http, render_id)
                    if kind != "succeeded":
                        raise RuntimeError(f"render {render_id} {kind}")

                await asyncio.gather(*(render(n) for n in range(total)))
                return total / (time.perf_counter() - started)

            await one_run(BATCH, "warm")
            rates = [await one_run(jobs, f"r{rep}") for rep in range(reps)]
        figures[str(count)] = {"renders_per_s": round(median(rates), 1), "reps": [round(r, 1) for r in rates]}
    return figures


async def bench(jobs: int, reps: int, renderflow_jobs: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="renderflow-procrastinate-") as tmp:
        async with database(Path(tmp)) as server_url:
            peer = await procrastinate_rates(server_url, jobs, reps)
    result: dict[str, Any] = {
        "scenario": "procrastinate",
        "settings": {"jobs": jobs, "reps": reps, "concurrency_per_worker": CONCURRENCY},
        "procrastinate_version": version("procrastinate"),
        "procrastinate": peer,
    }
    if renderflow_jobs:
        ours = await renderflow_rates(renderflow_jobs, reps)
        result["settings"]["renderflow_jobs"] = renderflow_jobs
        result["renderflow_http"] = ours
        result["ratio"] = {
            count: ratio(ours[count]["renders_per_s"], peer[count]["jobs_per_s"]) for count in ("1", "2")
        }
    return result


def main() -> None:
    # Through the module's import name: procrastinate warns about an App made in `__main__`.
    from tests.bench import bench_procrastinate as this

    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(this.run_worker(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--renderflow", action="store_true", help="also Renderflow's no-op renders/s over HTTP"
    )
    parser.add_argument("--renderflow-jobs", type=int, default=128, help="renders per Renderflow run")
    json_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = asyncio.run(this.bench(args.jobs, args.reps, args.renderflow_jobs if args.renderflow else 0))
    print(
        f"procrastinate {result['procrastinate_version']}, {args.jobs} no-op jobs, {CONCURRENCY} per worker:"
    )
    for count, figures in result["procrastinate"].items():
        line = f"  {count} worker(s): {figures['jobs_per_s']:.0f} jobs/s"
        if "renderflow_http" in result:
            ours = result["renderflow_http"][count]["renders_per_s"]
            line += f"; renderflow {ours:.0f} renders/s over HTTP -> ratio {result['ratio'][count]}"
        print(line)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
