"""One chaos run: the stack under steady load, each fault in turn with a recovery check after it,
then every accepted render followed to its end and the evidence gathered for the verdict."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.chaos.faults import (
    FAULT_KINDS,
    FaultWindow,
    hang_origin,
    kill_service,
    kill_worker,
    restart_postgres,
)
from tests.chaos.load import Load
from tests.chaos.stack import Stack, StackConfig, running_stack

PROJECT = "chaos"
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class ChaosOptions:
    """What a run does; the defaults are the full `make chaos`, `short()` the form in `make test`."""

    rate: float = 4.0
    """Submits per second of the steady load."""
    worker_kills: int = 3
    pg_down_s: float = 3.0
    settle_s: float = 3.0
    """Steady load before each fault."""
    quiet_s: float = 3.0
    """Error-free time after a fault that counts as recovered."""
    recovery_limit_s: float = 30.0
    drain_limit_s: float = 90.0
    """How long accepted renders may take to end once the load stops."""
    errors_stop_within_s: float = 10.0
    """Invariant: client-visible errors end this soon after the fault does."""
    faults: tuple[str, ...] = FAULT_KINDS
    stack: StackConfig = field(default_factory=StackConfig)

    @classmethod
    def short(cls) -> ChaosOptions:
        """One fault of each kind, a small load, short waits."""
        return cls(rate=3.0, worker_kills=1, pg_down_s=2.0, settle_s=1.5, quiet_s=2.0, drain_limit_s=60.0)


@dataclass
class RenderFacts:
    """What the API, the event log and the artifact directory say about one accepted render."""

    render_id: str
    sent: float
    reference: str
    found: bool = False
    status: str = ""
    error: dict[str, Any] | None = None
    attempts: int = 0
    finished_wall: float | None = None
    terminal_events: int = 0
    without_reference: bool = False
    output_sha256: str = ""
    artifact_sha256: str = ""
    outputs: int = 0
    """Output files stored under the render's id."""


@dataclass
class ChaosRun:
    """Everything a run observed; `report.verdict` judges it."""

    options: ChaosOptions
    started: float
    wall_offset: float
    """time.time() - time.monotonic() during the run, to place wall-clock timestamps."""
    faults: list[FaultWindow] = field(default_factory=list)
    load: Load | None = None
    renders: dict[str, RenderFacts] = field(default_factory=dict)
    stray_files: list[str] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    drained_s: float = 0.0


async def create_project(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    async with (
        aiohttp.ClientSession(stack.url, headers=headers) as http,
        http.post("/v1/projects", json={"slug": PROJECT, "name": "Chaos"}) as answer,
    ):
        if answer.status not in (201, 409):
            raise RuntimeError(f"cannot create the project: {answer.status} {await answer.text()}")


async def recovered(load: Load, window: FaultWindow, options: ChaosOptions) -> None:
    """Waits (bounded) until clients have seen no error for `quiet_s` and a submit sent after the
    fault ended was accepted; marks how far this fault's observation reaches."""
    deadline = window.ended + options.recovery_limit_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        errors = [r.sent + r.latency_s for r in load.responses if r.error and r.sent >= window.started]
        quiet = now - max(errors, default=window.ended) >= options.quiet_s
        accepted_after = any(not r.error and r.sent >= window.ended for r in load.responses)
        if quiet and accepted_after and now - window.ended >= options.quiet_s:
            break
        await asyncio.sleep(0.1)
    window.observed_until = time.monotonic()


async def inject(stack: Stack, kind: str, options: ChaosOptions) -> list[FaultWindow]:
    """The windows of one kind of fault (worker kills repeat)."""
    if kind == "worker_kill":
        return [await kill_worker(stack, f"kill -9 worker #{n + 1}") for n in range(options.worker_kills)]
    if kind == "pg_restart":
        return [await restart_postgres(stack, options.pg_down_s)]
    if kind in ("imagefetch_kill", "metadata_kill"):
        return [await kill_service(stack, kind.removesuffix("_kill"))]
    if kind == "origin_hang":
        return [await hang_origin(stack, stack.config.fetch_timeout_s + 3.0)]
    raise ValueError(f"unknown fault {kind!r}")


async def drain(stack: Stack, ids: list[str], limit_s: float) -> float:
    """Waits (bounded) until every render in `ids` is terminal; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        with contextlib.suppress(Exception):  # the database may still be finding its feet
            rows = await stack.query(
                "SELECT count(*) FROM generation.renders WHERE id = ANY(%s) AND status = ANY(%s)",
                [ids, list(TERMINAL)],
            )
            if rows[0][0] == len(ids):
                break
        await asyncio.sleep(0.25)
    return time.monotonic() - started


async def gather_facts(stack: Stack, run: ChaosRun) -> None:
    """Each accepted render through the API, plus its terminal events and its artifact."""
    assert run.load is not None
    run.renders = {
        a.render_id: RenderFacts(a.render_id, a.sent, a.reference) for a in run.load.accepted.values()
    }
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    limit = asyncio.Semaphore(16)

    async def fetch(http: aiohttp.ClientSession, facts: RenderFacts) -> None:
        async with limit, http.get(f"/v1/renders/{facts.render_id}") as answer:
            if answer.status == 404:
                return
            body = await answer.json()
            facts.found = True
            facts.status = body["status"]
            facts.error = body.get("error")
            facts.attempts = int(body.get("attempts") or 0)
            if body.get("finished_at"):
                facts.finished_wall = datetime.fromisoformat(body["finished_at"]).timestamp()

    async with aiohttp.ClientSession(stack.url, headers=headers) as http:
        await asyncio.gather(*(fetch(http, f) for f in run.renders.values()))
    ids = list(run.renders)
    rows = await stack.query(
        "SELECT render_id, count(*) FILTER (WHERE type IN ('succeeded', 'failed', 'cancelled')),"
        " bool_or(type = 'phase' AND payload->>'message' LIKE 'going on without the reference%%')"
        " FROM generation.events WHERE render_id = ANY(%s) GROUP BY render_id",
        [ids],
    )
    for render_id, terminal, without in rows:
        run.renders[render_id].terminal_events = int(terminal)
        run.renders[render_id].without_reference = bool(without)
    # The digest of the output as recorded (the API does not show it).
    rows = await stack.query(
        "SELECT id, output->>'sha256' FROM generation.renders WHERE id = ANY(%s) AND output IS NOT NULL",
        [ids],
    )
    for render_id, sha in rows:
        run.renders[render_id].output_sha256 = sha or ""
    for path in sorted(stack.artifact_dir.rglob("*")) if stack.artifact_dir.exists() else []:
        if not path.is_file():
            continue
        # Named by render id (an extension, if any, after it); temporary files start with a dot.
        owner = run.renders.get(path.name.partition(".")[0])
        if owner is None:
            run.stray_files.append(str(path.relative_to(stack.artifact_dir)))
        elif owner.artifact_sha256:
            owner.outputs += 1
        else:
            owner.artifact_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            owner.outputs = 1


async def run_chaos(workdir: Path, options: ChaosOptions, say: Callable[[str], None] = print) -> ChaosRun:
    """Starts a stack in `workdir`, runs every fault of `options` under load, gathers the evidence."""
    async with running_stack(workdir, options.stack) as stack:
        say(f"stack up at {stack.url} ({options.stack.workers} workers); load {options.rate:g} submits/s")
        await create_project(stack)
        run = ChaosRun(options, time.monotonic(), time.time() - time.monotonic())
        load = Load(
            stack.url,
            stack.api_key,
            PROJECT,
            lambda n: stack.origin.url(f"/gated/ref-{n}"),
            rate=options.rate,
            steps=max(1, round(1000 / max(options.stack.step_ms, 1.0))),
        )
        run.load = load
        load_task = asyncio.create_task(load.run(), name="chaos-load")
        try:
            for kind in options.faults:
                await asyncio.sleep(options.settle_s)
                for window in await inject(stack, kind, options):
                    say(f"  {window.label}: {window.detail}")
                    await recovered(load, window, options)
                    run.faults.append(window)
                    if kind == "worker_kill":
                        await asyncio.sleep(options.settle_s / 2)
            await asyncio.sleep(options.settle_s)
        finally:
            load.stop()
            await load_task
        say(f"load stopped: {len(load.responses)} submits, {len(load.accepted)} accepted; draining ...")
        run.drained_s = await drain(stack, list(load.accepted), options.drain_limit_s)
        await gather_facts(stack, run)
        run.restarts = stack.supervisor.restarts()
        return run
