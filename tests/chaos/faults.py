"""The faults a chaos run injects into a running stack. Each returns its window: when it began,
when it was over (the killed process serves again, the database is back, the origin answers), and
which render failures it makes right."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tests.chaos.stack import Stack

# Render failures (error code, reason) that a fault explains; any other failure is a violation.
EXPLAINED: dict[str, frozenset[tuple[str, str]]] = {
    # Only when the same render lost all its attempts to kills.
    "worker_kill": frozenset({("generation_failed", "lease_expired")}),
    "pg_restart": frozenset({("generation_failed", "lease_expired")}),
    # Renders wait for a restarting image-fetch service (RENDERFLOW_WORKER_IMAGEFETCH_OUTAGE_S): none fails.
    "imagefetch_kill": frozenset(),
    "metadata_kill": frozenset(),
    # A required reference from an origin that never answers: the fetch deadline ends it.
    "origin_hang": frozenset({("reference_fetch_failed", "timeout")}),
}
FAULT_KINDS = tuple(EXPLAINED)


@dataclass
class FaultWindow:
    """One injected fault, in monotonic seconds."""

    kind: str
    label: str
    started: float
    ended: float = 0.0
    detail: str = ""
    in_flight: list[str] = field(default_factory=list)
    """Renders running in the killed process when it died."""
    observed_until: float = 0.0
    """When the recovery check after it finished (responses up to here count for this fault)."""

    @property
    def explains(self) -> frozenset[tuple[str, str]]:
        return EXPLAINED[self.kind]


async def running_jobs(stack: Stack) -> dict[int, list[str]]:
    """Render ids running now, by the pid of the worker holding them (worker ids end in `-<pid>`)."""
    rows = await stack.query("SELECT worker_id, render_id FROM generation.jobs WHERE state = 'running'")
    by_pid: dict[int, list[str]] = {}
    for worker_id, render_id in rows:
        pid = str(worker_id or "").rpartition("-")[2]
        if pid.isdigit():
            by_pid.setdefault(int(pid), []).append(render_id)
    return by_pid


async def kill_worker(stack: Stack, label: str, timeout_s: float = 20.0) -> FaultWindow:
    """SIGKILL a worker while it runs renders; over when the supervisor has started its successor."""
    async with asyncio.timeout(timeout_s):
        while True:
            jobs = await running_jobs(stack)
            victims = [(n, stack.pid(n)) for n in stack.worker_names() if jobs.get(stack.pid(n) or -1)]
            if victims:
                break
            await asyncio.sleep(0.05)
    name, pid = max(victims, key=lambda v: len(jobs[v[1] or -1]))
    assert pid is not None
    window = FaultWindow("worker_kill", label, time.monotonic(), in_flight=jobs[pid])
    stack.kill(name)
    window.ended = await stack.wait_serving(name, pid)
    window.detail = f"kill -9 {name} (pid {pid}) with {len(window.in_flight)} render(s) running"
    return window


async def restart_postgres(stack: Stack, down_s: float) -> FaultWindow:
    """Stops PostgreSQL (every connection cut), keeps it down `down_s`, starts it again."""
    window = FaultWindow("pg_restart", "restart PostgreSQL", time.monotonic())
    await stack.stop_postgres()
    await asyncio.sleep(down_s)
    await stack.start_postgres()
    window.ended = time.monotonic()
    window.detail = f"down {window.ended - window.started:.1f} s"
    return window


async def kill_service(stack: Stack, name: str) -> FaultWindow:
    """SIGKILL a gRPC service; over when its successor passes the health check."""
    pid = stack.pid(name)
    window = FaultWindow(f"{name}_kill", f"kill -9 {name}", time.monotonic())
    stack.kill(name)
    window.ended = await stack.wait_serving(name, pid)
    window.detail = f"pid {pid}; serving again after {window.ended - window.started:.1f} s"
    return window


async def hang_origin(stack: Stack, hold_s: float) -> FaultWindow:
    """Every fetch from the reference origin hangs for `hold_s`; then it answers again."""
    window = FaultWindow("origin_hang", "origin hangs every fetch", time.monotonic())
    stack.origin.gate.clear()
    try:
        await asyncio.sleep(hold_s)
    finally:
        stack.origin.gate.set()
    window.ended = time.monotonic()
    window.detail = f"{hold_s:g} s of hanging fetches"
    return window
