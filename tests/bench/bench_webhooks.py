"""Webhooks off the render path: renders per second with no webhook, with every render's webhook
sent to a receiver that hangs every request, and to one that answers 200 after a second.

One stack (the product's settings, 2 workers of 4 slots, procedural renders of 2 steps of 2 ms);
per repetition three phases, each submitting the same `--renders` renders in batches of 64
(`POST /v1/renders:batch`) and following each batch on its event stream until every render
succeeded; renders/s from the first submit to the last render's end, median over `--reps`. The
order of the phases turns from one repetition to the next (so each phase runs first, second and
last as often), cancelling drift.

- `none`: no webhook;
- `hanging`: every render's webhook asks for queued, started, progress and completed, and the
  receiver holds every request open until the phase ends (the dispatcher's attempts stay in flight,
  the rest of the outbox waits);
- `slow`: the same webhooks; the receiver answers 200 after `--slow-s`.

At each phase's end: the phase's deliveries delivered, in flight, pending, the requests the
receiver saw, the backlog (due deliveries, and the age of the oldest), and CPU ms per render by
process. Then the deliveries still pending are given up (`failed`, `bench_reset`), the receiver
lets its requests go and the attempts in flight end, so that the next phase starts without a
backlog. With `--keep-backlog` they are not given up: the backlog grows from phase to phase (the
receiver answers at once between phases, and in `none` phases) and weighs on the phases after it,
`none` included, as a receiver down for a long while would.

    .venv/bin/python -m tests.bench.bench_webhooks [--renders 256] [--reps 6] [--keep-backlog] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from shared.contract import MAX_BATCH
from tests.bench.costs import process_cpu_s
from tests.bench.figures import json_argument, median, ratio, write_json
from tests.bench.rfclient import TERMINAL, ensure_project, event_types, render_body
from tests.chaos.stack import Stack, StackConfig, running_stack
from tests.support import serve_on_loopback

PROJECT = "webhooks"
STEPS = 2
STEP_MS = 2.0
EVENTS = ["queued", "started", "progress", "completed"]
PHASES = ("none", "hanging", "slow")
SETTLE_LIMIT_S = 5.0
"""How long a phase's attempts still in flight may take to end once the receiver lets them go."""


class Hook:
    """A webhook receiver on 127.0.0.1 that answers 200 at once (`ok`), after `delay_s` (`slow`),
    or once `release()` is called (`hang`); it counts the requests it saw and held open at once."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.mode = "ok"
        self.requests = 0
        self.open = 0
        self.most_open = 0
        self.port = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    def arm(self, mode: str) -> None:
        """Answers every request from now on as `mode` says; the counts start again."""
        self.mode = mode
        self._released = asyncio.Event()
        self.requests = self.most_open = 0

    def release(self) -> None:
        """Ends the requests held open, and answers the next ones at once."""
        self.mode = "ok"
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            if self.mode == "hang":
                await self._released.wait()
            elif self.mode == "slow":
                await asyncio.sleep(self.delay_s)
        finally:
            self.open -= 1
        return web.Response(text="ok")


async def _submit_batch(
    http: aiohttp.ClientSession, first: int, count: int, webhook: dict[str, Any] | None
) -> tuple[str, list[str]]:
    """Queues renders `first`.. as one batch; returns its id and its renders' ids."""
    body: dict[str, Any] = {
        "items": [render_body(PROJECT, n, steps=STEPS, size=64) for n in range(first, first + count)]
    }
    if webhook is not None:
        body["webhook"] = webhook
    async with http.post("/v1/renders:batch", json=body) as answer:
        payload = await answer.json(content_type=None)
        if answer.status != 202:
            raise RuntimeError(f"POST /v1/renders:batch: {answer.status} {payload}")
    return str(payload["batch_id"]), [str(render["id"]) for render in payload["renders"]]


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


async def _renders(
    http: aiohttp.ClientSession, first: int, count: int, webhook: dict[str, Any] | None
) -> tuple[float, list[str]]:
    """Submits `count` renders in batches, following each batch as soon as it is queued; the
    seconds from the first submit to the last render's end, and the renders' ids."""
    started = time.perf_counter()
    followers = []
    ids: list[str] = []
    for offset in range(0, count, MAX_BATCH):
        size = min(MAX_BATCH, count - offset)
        batch_id, batch_ids = await _submit_batch(http, first + offset, size, webhook)
        ids += batch_ids
        followers.append(asyncio.create_task(_follow_batch(http, batch_id, size)))
    await asyncio.gather(*followers)
    return time.perf_counter() - started, ids


async def _deliveries(stack: Stack, render_ids: list[str]) -> dict[str, Any]:
    """Where the deliveries of these renders stand, and the age of the whole outbox's backlog."""
    rows = await stack.query(
        "SELECT count(*), count(*) FILTER (WHERE state = 'delivered'),"
        " count(*) FILTER (WHERE state = 'pending' AND leased_until > now()),"
        " count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'failed'),"
        " coalesce(sum(attempts), 0)"
        " FROM generation.webhook_deliveries WHERE render_id = ANY(%s)",
        (render_ids,),
    )
    made, delivered, in_flight, pending, failed, attempts = rows[0]
    backlog = await stack.query(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8"
        " FROM generation.webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= now()"
    )
    return {
        "made": made,
        "delivered": delivered,
        "in_flight": in_flight,
        "pending": pending,
        "failed": failed,
        "attempts": int(attempts),
        "backlog": backlog[0][0],
        "backlog_age_s": round(float(backlog[0][1]), 2),
    }


async def _give_up(stack: Stack, waiting_only: bool) -> int:
    """Marks the pending deliveries (only those not in flight, if `waiting_only`) `failed`
    (`bench_reset`); returns how many."""
    only = " AND (leased_until IS NULL OR leased_until < now())" if waiting_only else ""
    rows = await stack.query(
        "WITH given_up AS (UPDATE generation.webhook_deliveries SET state = 'failed',"
        " last_outcome = 'bench_reset', leased_until = NULL WHERE state = 'pending'" + only + " RETURNING 1)"
        " SELECT count(*) FROM given_up"
    )
    return int(rows[0][0])


async def _reset(stack: Stack, hook: Hook, keep_backlog: bool = False) -> int:
    """Gives up the deliveries waiting (unless `keep_backlog`), lets the receiver's requests go,
    waits (bounded) for the attempts in flight to end, gives up what is left, and vacuums the
    table; returns how many deliveries were given up."""
    given_up = 0 if keep_backlog else await _give_up(stack, waiting_only=True)
    hook.release()
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while time.monotonic() < deadline:
        rows = await stack.query(
            "SELECT count(*) FROM generation.webhook_deliveries WHERE state = 'pending'"
            " AND leased_until > now()"
        )
        if rows[0][0] == 0:
            break
        await asyncio.sleep(0.02)
    if not keep_backlog:
        given_up += await _give_up(stack, waiting_only=False)
    # Now, rather than by autovacuum in the middle of the next phase.
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        await conn.execute("VACUUM generation.webhook_deliveries")
    return given_up


async def _phase(
    stack: Stack,
    http: aiohttp.ClientSession,
    hook: Hook,
    name: str,
    first: int,
    count: int,
    keep_backlog: bool,
) -> dict[str, Any]:
    """One phase: `count` renders with the webhook `name` says; its rate, deliveries and CPU."""
    hook.arm({"none": "ok", "hanging": "hang", "slow": "slow"}[name])
    webhook = None if name == "none" else {"url": hook.url, "events": EVENTS}
    cpu_before = process_cpu_s(stack)
    seconds, ids = await _renders(http, first, count, webhook)
    cpu_after = process_cpu_s(stack)
    deliveries = await _deliveries(stack, ids)
    deliveries["receiver_requests"] = hook.requests
    deliveries["receiver_most_open"] = hook.most_open
    deliveries["given_up_after"] = await _reset(stack, hook, keep_backlog)
    cpu = {part: (spent - cpu_before.get(part, 0.0)) * 1000 / count for part, spent in cpu_after.items()}
    # What the rest of the machine spent meanwhile: much of it means another load disturbed the phase.
    ours = sum(ms for part, ms in cpu.items() if part != "whole machine")
    cpu["other processes"] = cpu["whole machine"] - ours
    return {
        "renders_per_s": round(count / seconds, 1),
        "seconds": round(seconds, 3),
        "deliveries": deliveries,
        "cpu_ms_per_render": {part: round(ms, 3) for part, ms in cpu.items()},
    }


def _orders(reps: int) -> list[tuple[str, ...]]:
    """The phases' order in each repetition: turned by one each time, so that over 3 repetitions
    each phase runs first, second and last once."""
    return [PHASES[r % len(PHASES) :] + PHASES[: r % len(PHASES)] for r in range(reps)]


def cpu_line(cpu_ms: dict[str, float]) -> str:
    """`generation 1.70, workers 4.10, ...`: the processes that spent 0.05 ms per render or more."""
    return ", ".join(f"{part} {ms:.2f}" for part, ms in cpu_ms.items() if ms >= 0.05)


def _median_cpu(runs: list[dict[str, Any]]) -> dict[str, float]:
    parts = runs[0]["cpu_ms_per_render"]
    return {part: round(median([run["cpu_ms_per_render"][part] for run in runs]), 3) for part in parts}


async def bench(renders: int, reps: int, slow_s: float, keep_backlog: bool = False) -> dict[str, Any]:
    config = StackConfig.product_defaults(STEP_MS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PHASES}
    hook = Hook(slow_s)
    await hook.start()
    try:
        with tempfile.TemporaryDirectory(prefix="renderflow-webhooks-") as workdir:
            async with running_stack(Path(workdir), config) as stack:
                headers = {"Authorization": f"Bearer {stack.api_key}"}
                timeout = aiohttp.ClientTimeout(total=120)
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(
                    stack.url, headers=headers, timeout=timeout, connector=connector
                ) as http:
                    await ensure_project(http, PROJECT)
                    # Warm-up: renders without and with a webhook (delivered at once), then no backlog.
                    await _renders(http, 0, MAX_BATCH, None)
                    await _renders(http, MAX_BATCH, MAX_BATCH, {"url": hook.url, "events": EVENTS})
                    await asyncio.sleep(1.0)
                    await _reset(stack, hook)
                    first = 2 * MAX_BATCH
                    for rep, order in enumerate(_orders(reps)):
                        for name in order:
                            run = await _phase(stack, http, hook, name, first, renders, keep_backlog)
                            first += renders
                            runs[name].append(run)
                            d = run["deliveries"]
                            print(
                                f"rep {rep + 1} {name:<8} {run['renders_per_s']:7.1f} renders/s  "
                                f"deliveries {d['made']} made, {d['delivered']} delivered, "
                                f"{d['in_flight']} in flight, {d['pending']} pending; "
                                f"backlog {d['backlog']} ({d['backlog_age_s']:.1f} s old)",
                                flush=True,
                            )
    finally:
        await hook.stop()
    phases = {
        name: {
            "renders_per_s": round(median([run["renders_per_s"] for run in runs[name]]), 1),
            "reps": [run["renders_per_s"] for run in runs[name]],
            "deliveries": runs[name][-1]["deliveries"],
            "deliveries_by_rep": [run["deliveries"] for run in runs[name]],
            "cpu_ms_per_render": _median_cpu(runs[name]),
        }
        for name in PHASES
    }
    paired = {
        name: [round(r / n, 4) for r, n in zip(phases[name]["reps"], phases["none"]["reps"], strict=True)]
        for name in ("hanging", "slow")
    }
    return {
        "scenario": "webhooks",
        "settings": {
            "renders": renders,
            "reps": reps,
            "batch": MAX_BATCH,
            "steps": STEPS,
            "step_ms": STEP_MS,
            "events": EVENTS,
            "slow_s": slow_s,
            "keep_backlog": keep_backlog,
            "orders": [list(order) for order in _orders(reps)],
        },
        "phases": phases,
        "ratios": {
            "hanging_vs_none": ratio(phases["hanging"]["renders_per_s"], phases["none"]["renders_per_s"]),
            "slow_vs_none": ratio(phases["slow"]["renders_per_s"], phases["none"]["renders_per_s"]),
            "hanging_vs_none_paired": round(median(paired["hanging"]), 4),
            "slow_vs_none_paired": round(median(paired["slow"]), 4),
            "hanging_vs_none_by_rep": paired["hanging"],
            "slow_vs_none_by_rep": paired["slow"],
        },
        "target_ratio": 0.9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--renders", type=int, default=256, help="renders per phase")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--slow-s", type=float, default=1.0, help="the slow receiver's delay")
    parser.add_argument(
        "--keep-backlog", action="store_true", help="leave each phase's undelivered deliveries pending"
    )
    json_argument(parser)
    args = parser.parse_args()
    result = asyncio.run(bench(args.renders, args.reps, args.slow_s, args.keep_backlog))
    for name in PHASES:
        phase = result["phases"][name]
        print(f"{name:<8} {phase['renders_per_s']:7.1f} renders/s (median of {phase['reps']})")
        print(f"         CPU ms per render: {cpu_line(phase['cpu_ms_per_render'])}")
    ratios = result["ratios"]
    print(
        f"hanging/none {ratios['hanging_vs_none']} (paired by rep {ratios['hanging_vs_none_paired']}), "
        f"slow/none {ratios['slow_vs_none']} (paired by rep {ratios['slow_vs_none_paired']}); target >= 0.9"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
