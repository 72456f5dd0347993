"""The work path: no-op renders (zero step latency) per second with 1, 2 and 4 worker processes of
4 slots each, submitted over HTTP in batches of 64 as the peer defers its jobs
(`bench_procrastinate`), each batch followed on its event stream until every render succeeded;
median over `--reps`. The product's settings, durable PostgreSQL.

With every worker count, one more run measures the cost of a render by part:
- CPU ms per render of each process (the gateway, generation, the workers together, PostgreSQL's
  backends together, the rest) and of the whole machine;
- PostgreSQL's side: statements (pg_stat_statements, top level: one per round trip or pipelined
  statement), transactions that wrote, WAL bytes and WAL fsyncs per render, and the NOTIFYs sent
  (counted by a listener on every channel);
- what PostgreSQL's active backends were waiting for (sampled every 5 ms: a row lock, the WAL's
  flush, NOTIFY's commit lock, or running), by statement;
- with py-spy installed, the first worker's CPU by part of the work path (claim, events, backend,
  artifact write, finish, the rest), from samples of its stacks.

    .venv/bin/python -m tests.bench.bench_queue [--jobs 512] [--reps 3] [--workers 1,2,4] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from shared.contract import MAX_BATCH
from tests.bench.costs import process_cpu_s, sampled_waits
from tests.bench.figures import json_argument, median, write_json
from tests.bench.rfclient import TERMINAL, ensure_project, event_types, render_body
from tests.chaos.stack import Stack, StackConfig, running_stack

PROJECT = "queue"
STATS_SETTLE_S = 11.0
CHANNELS = ("generation_jobs", "generation_events", "generation_cancel")
PARTS = {
    # The first function of these found in a sample's stack (innermost first) names its part.
    "Worker.claim_loop": "claim",
    "EventWriter.write": "events",
    "EventWriter.progress": "events",
    "References.resolve": "reference",
    "generate": "backend",
    "LocalArtifactStore._put": "artifact write",
    "LocalArtifactStore.put": "artifact write",
    "JobStore.finish": "finish",
    "Store.finish": "finish",
    "Store.get_any": "render read",
    "JobRunner._phase": "phase spans",
    "JobRunner._work": "work (other)",
    "JobRunner._attempt": "render span",
    "Worker.heartbeat_loop": "heartbeat",
    "BatchProcessor.worker": "span export",
}


async def _submit_batch(http: aiohttp.ClientSession, first: int, count: int) -> str:
    items = [render_body(PROJECT, n, steps=1, size=64) for n in range(first, first + count)]
    async with http.post("/v1/renders:batch", json={"items": items}) as answer:
        payload = await answer.json(content_type=None)
        if answer.status != 202:
            raise RuntimeError(f"POST /v1/renders:batch: {answer.status} {payload}")
    return str(payload["batch_id"])


async def _follow_batch(http: aiohttp.ClientSession, batch_id: str, count: int) -> None:
    """Reads the batch's event stream until each of its renders has succeeded."""
    ended = 0
    async for kind in event_types(http, f"/v1/batches/{batch_id}/events"):
        if kind in TERMINAL:
            if kind != "succeeded":
                raise RuntimeError(f"a render of batch {batch_id} {kind}")
            ended += 1
            if ended == count:
                return
    raise RuntimeError(f"the event stream of batch {batch_id} ended after {ended} of {count} renders")


async def renders_per_second(http: aiohttp.ClientSession, jobs: int) -> float:
    """Submits `jobs` renders in batches, one after another, while following each batch; renders/s
    from the first submit to the last render's end."""
    started = time.perf_counter()
    followers = []
    for first in range(0, jobs, MAX_BATCH):
        count = min(MAX_BATCH, jobs - first)
        batch_id = await _submit_batch(http, first, count)
        followers.append(asyncio.create_task(_follow_batch(http, batch_id, count)))
    await asyncio.gather(*followers)
    return jobs / (time.perf_counter() - started)


# Costs by part ---------------------------------------------------------------------------------


async def _database_figures(conn: psycopg.AsyncConnection[Any]) -> dict[str, float]:
    """WAL written and transactions that wrote (the next transaction id: read-only ones take none)
    so far."""
    cur = await conn.execute(
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    )
    row = await cur.fetchone()
    assert row is not None
    return {"wal_bytes": float(row[0]), "writing_commits": float(row[1])}


async def _wal_fsyncs(conn: psycopg.AsyncConnection[Any]) -> float:
    """WAL fsyncs so far: pg_stat_io from PostgreSQL 18 (pg_stat_wal no longer has them), else
    pg_stat_wal. Backends publish these counters at most every second, and once idle for
    PostgreSQL's idle interval (10 s): read after a quiet spell, they are complete."""
    await asyncio.sleep(STATS_SETTLE_S)
    cur = await conn.execute("SELECT current_setting('server_version_num')::int")
    row = await cur.fetchone()
    if row is not None and row[0] >= 180000:
        cur = await conn.execute("SELECT coalesce(sum(fsyncs), 0) FROM pg_stat_io WHERE object = 'wal'")
    else:
        cur = await conn.execute("SELECT wal_sync FROM pg_stat_wal")
    row = await cur.fetchone()
    return float(row[0]) if row is not None else 0.0


async def _statements(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, int]]:
    """Top-level statements since the last reset, by text (first words), most called first."""
    cur = await conn.execute(
        "SELECT query, calls FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database()) AND query NOT LIKE '%pg_stat_statements%'"
        " AND query NOT LIKE '%pg_current_wal_lsn%' AND query NOT LIKE '%pg_stat_activity%'"
        " ORDER BY calls DESC"
    )
    return [(" ".join(query.split())[:70], int(calls)) for query, calls in await cur.fetchall()]


@contextlib.asynccontextmanager
async def _notifications(database_url: str) -> AsyncIterator[Counter[str]]:
    """NOTIFYs received on every channel of the stack while the block runs."""
    counts: Counter[str] = Counter()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for channel in CHANNELS:
            await conn.execute(f"LISTEN {channel}")

        async def count() -> None:
            async for note in conn.notifies():
                counts[note.channel] += 1

        task = asyncio.create_task(count())
        try:
            yield counts
        finally:
            await asyncio.sleep(0.2)  # the last notifications of the run are on their way
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _shares(waits: Counter[tuple[str, str]]) -> list[dict[str, Any]]:
    """The most frequent (wait, statement) pairs of PostgreSQL's active backends, as shares."""
    total = sum(waits.values()) or 1
    return [
        {"wait": wait, "statement": statement, "share": round(count / total, 3)}
        for (wait, statement), count in waits.most_common(6)
    ]


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return None
    # --gil: only samples holding the GIL, i.e. Python running (not threads or a loop waiting).
    command = [py_spy, "record", "--gil", "--rate", "200", "--format", "raw", "--output", str(out)]
    command += ["--pid", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()


def _part_key(frame: str) -> str:
    """`Class.method` or `function`; a backend's `generate` whatever its class."""
    return "generate" if frame.endswith(".generate") else frame


def parts_of_profile(raw: Path) -> dict[str, float]:
    """Shares of a py-spy raw profile (folded stacks, outermost first) by part of the work path."""
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        part = next((PARTS[k] for f in reversed(frames) if (k := _part_key(f)) in PARTS), "other")
        samples[part] += int(count)
    total = sum(samples.values()) or 1
    return {part: round(n / total, 3) for part, n in samples.most_common()}


async def measured_run(
    stack: Stack, http: aiohttp.ClientSession, jobs: int, spy_dir: Path | None
) -> dict[str, Any]:
    """One run of `jobs` renders with everything it cost, per render."""
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        fsyncs_before = await _wal_fsyncs(conn)
        await conn.execute("SELECT pg_stat_statements_reset()")
        db_before = await _database_figures(conn)
        spy = None
        profile = None
        if spy_dir is not None and (pid := stack.pid("worker-1")) is not None:
            profile = spy_dir / "worker-1.raw"
            spy = _start_py_spy(pid, profile)
            await asyncio.sleep(0.5)  # py-spy attaches
        cpu_before = process_cpu_s(stack)
        async with (
            _notifications(stack.database_url) as notifies,
            sampled_waits(stack.database_url, True) as waits,
        ):
            rate = await renders_per_second(http, jobs)
        cpu_after = process_cpu_s(stack)
        _stop_py_spy(spy)
        db_after = await _database_figures(conn)
        statements = await _statements(conn)
        fsyncs_after = await _wal_fsyncs(conn)
    per = 1.0 / jobs
    figures: dict[str, Any] = {
        "renders_per_s": round(rate, 1),
        "cpu_ms_per_render": {
            name: round((cpu_after[name] - cpu_before.get(name, 0.0)) * 1000 * per, 3) for name in cpu_after
        },
        "statements_per_render": round(sum(calls for _, calls in statements) * per, 2),
        "top_statements": [
            {"statement": text, "per_render": round(calls * per, 2)} for text, calls in statements[:10]
        ],
        "writing_commits_per_render": round(
            (db_after["writing_commits"] - db_before["writing_commits"]) * per, 2
        ),
        "wal_bytes_per_render": round((db_after["wal_bytes"] - db_before["wal_bytes"]) * per),
        "wal_fsyncs_per_render": round((fsyncs_after - fsyncs_before) * per, 2),
        "notifies_per_render": {channel: round(n * per, 2) for channel, n in sorted(notifies.items())},
        "artifact_fsyncs_per_render": 2,  # the file and its directory (LocalArtifactStore.put)
        "database_waits": _shares(waits),
    }
    if profile is not None and profile.exists():
        figures["worker_cpu_share_by_part"] = parts_of_profile(profile)
    return figures


async def bench(jobs: int, reps: int, worker_counts: list[int], spy_dir: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for count in worker_counts:
        config = StackConfig.product_defaults(
            0.0, workers=count, pg_settings={"shared_preload_libraries": "pg_stat_statements"}
        )
        with tempfile.TemporaryDirectory(prefix="renderflow-queue-") as workdir:
            async with running_stack(Path(workdir), config) as stack:
                async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                headers = {"Authorization": f"Bearer {stack.api_key}"}
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(stack.url, headers=headers, timeout=timeout) as http:
                    await ensure_project(http, PROJECT)
                    await renders_per_second(http, MAX_BATCH)  # warm-up
                    rates = [await renders_per_second(http, jobs) for _ in range(reps)]
                    # The costs of a render hardly depend on the worker count: measured once.
                    costs = (
                        await measured_run(stack, http, jobs, spy_dir) if count == worker_counts[0] else None
                    )
        results[str(count)] = {
            "workers": count,
            "renders_per_s": round(median(rates), 1),
            "reps": [round(r, 1) for r in rates],
        }
        if costs is not None:
            results[str(count)]["costs"] = costs
        print(f"{count} worker(s): {results[str(count)]['renders_per_s']:.0f} renders/s", flush=True)
    return {
        "scenario": "queue",
        "settings": {"jobs": jobs, "reps": reps, "batch": MAX_BATCH, "concurrency_per_worker": 4},
        "workers": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4", help="worker process counts, comma-separated")
    parser.add_argument("--no-py-spy", action="store_true", help="no profile of the first worker")
    json_argument(parser)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="renderflow-queue-spy-") as spy_dir:
        result = asyncio.run(bench(args.jobs, args.reps, counts, None if args.no_py_spy else Path(spy_dir)))
    print(json.dumps(result, indent=1))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
