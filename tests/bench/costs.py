"""What the stack spends while a benchmark runs: CPU seconds by process, and what PostgreSQL's
active backends wait for (shared by `bench_queue` and `profile_submit`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import psutil
import psycopg

from tests.chaos.stack import Stack

WAIT_SAMPLE_S = 0.005


def process_cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each part of the stack (PostgreSQL's backends, live and exited)."""
    spent: dict[str, float] = {}
    for name, pid in stack.supervisor.pids().items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            part = "workers" if name.startswith("worker") else name
            spent[part] = spent.get(part, 0.0) + times.user + times.system
    with contextlib.suppress(psutil.Error, OSError, ValueError):
        postmaster = int((stack.postgres.data_dir / "postmaster.pid").read_text().split()[0])
        server = psutil.Process(postmaster)
        own = server.cpu_times()
        spent["postgresql"] = own.user + own.system + own.children_user + own.children_system
        for child in server.children():
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                spent["postgresql"] += times.user + times.system
    machine = psutil.cpu_times()
    spent["whole machine"] = machine.user + machine.system + machine.nice + machine.irq + machine.softirq
    own_times = psutil.Process().cpu_times()
    spent["load generator"] = own_times.user + own_times.system
    return spent


@contextlib.asynccontextmanager
async def sampled_waits(database_url: str, enabled: bool) -> AsyncIterator[Counter[tuple[str, str]]]:
    """What the active backends wait for, sampled every few milliseconds while the block runs."""
    waits: Counter[tuple[str, str]] = Counter()
    if not enabled:
        yield waits
        return
    query = (
        "SELECT coalesce(wait_event_type, 'CPU'), coalesce(wait_event, ''), left(query, 40)"
        " FROM pg_stat_activity WHERE backend_type = 'client backend' AND state = 'active'"
        " AND pid <> pg_backend_pid()"
    )

    async def sample() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            while True:
                cur = await conn.execute(query)
                for kind, event, statement in await cur.fetchall():
                    waits[(f"{kind}/{event}".rstrip("/"), " ".join(statement.split()))] += 1
                await asyncio.sleep(WAIT_SAMPLE_S)

    task = asyncio.create_task(sample())
    try:
        yield waits
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
