"""Renderflow against the seed's design (tests/bench/baseline) in the same run, on the same
PostgreSQL, backend and step latency, with the same slow reference origin:

- request latency: `clients` clients each submitting `per_client` renders one after another
  (Renderflow answers 202, the baseline when the image is done); also Renderflow's time to result;
- batch makespan: 8 renders x 2 s of generation (20 steps x 100 ms), Renderflow's in parallel on its
  workers, the baseline's one after another.

    .venv/bin/python -m tests.bench.bench_baseline [--reps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.bench.figures import json_argument, latency_summary, median, ratio, write_json
from tests.bench.rfclient import (
    Target,
    ensure_project,
    render_body,
    renderflow,
    session,
    submit,
    wait_terminal,
)
from tests.chaos.stack import StackConfig
from tests.support.origin import Origin

PROJECT = "bench"  # the baseline's own project has the same slug


class Baseline:
    """The baseline server in a process of its own (as the gateway is)."""

    def __init__(self, database_url: str, step_ms: float) -> None:
        self._argv = [
            sys.executable, "-m", "tests.bench.baseline", "--database-url", database_url,
            "--step-ms", f"{step_ms:g}",
        ]  # fmt: skip
        self._process: asyncio.subprocess.Process | None = None
        self.url = ""

    async def __aenter__(self) -> Baseline:
        self._process = await asyncio.create_subprocess_exec(*self._argv, stdout=asyncio.subprocess.PIPE)
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), 30)
        if not line.startswith(b"listening on "):
            raise RuntimeError(f"the baseline did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


async def clients_run(clients: int, per_client: int, one: Callable[[int], Awaitable[None]]) -> float:
    """`clients` concurrent loops of `per_client` calls of `one(n)`; returns the wall time."""
    started = time.perf_counter()

    async def client(c: int) -> None:
        for k in range(per_client):
            await one(c * per_client + k)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - started


async def renderflow_requests(
    target: Target, origin: Origin, rep: int, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Milliseconds to the 202, and to the result, of each Renderflow submit. Each client waits for
    its render's result before it submits the next, as the baseline's clients must: the same load."""
    to_accept: list[float] = []
    to_result: list[float] = []
    async with session(target) as http:

        async def one(n: int) -> None:
            url = origin.url(f"/slow/rf-{rep}-{n}?delay={args.origin_delay}")
            started = time.perf_counter()
            render_id, elapsed = await submit(
                http, render_body(PROJECT, n, steps=args.steps, size=args.size, reference_url=url)
            )
            to_accept.append(elapsed * 1000)
            kind, ended = await wait_terminal(http, render_id)
            if kind != "succeeded":
                raise RuntimeError(f"render {render_id} {kind}")
            to_result.append((ended - started) * 1000)

        await clients_run(args.clients, args.per_client, one)
    return to_accept, to_result


async def baseline_requests(
    baseline: Baseline, origin: Origin, rep: int, args: argparse.Namespace
) -> list[float]:
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=None)  # the seed's clients waited as long as it took
    async with aiohttp.ClientSession(baseline.url, timeout=timeout) as http:

        async def one(n: int) -> None:
            url = origin.url(f"/slow/bl-{rep}-{n}?delay={args.origin_delay}")
            started = time.perf_counter()
            async with http.post(
                "/render", json=render_body(PROJECT, n, steps=args.steps, size=args.size, reference_url=url)
            ) as answer:
                answer.raise_for_status()
                await answer.read()
            latencies.append((time.perf_counter() - started) * 1000)

        await clients_run(args.clients, args.per_client, one)
    return latencies


async def renderflow_batch(target: Target, rep: int, args: argparse.Namespace) -> tuple[float, str]:
    """Seconds from the batch's submit to its last render's end, and how it was submitted."""
    items = [
        render_body(PROJECT, 1000 * rep + n, steps=args.steps, size=args.size) for n in range(args.batch)
    ]
    async with session(target) as http:
        started = time.perf_counter()
        async with http.post("/v1/renders:batch", json={"items": items}) as answer:
            payload = await answer.json(content_type=None)
            status = answer.status
        if status == 202:
            ids = [r["id"] for r in payload["renders"]]
            how = "POST /v1/renders:batch"
        else:  # no batch route in this gateway: the client's own batch, submitted at once
            ids = [rid for rid, _ in await asyncio.gather(*(submit(http, item) for item in items))]
            how = f"{args.batch} concurrent POST /v1/renders (batch route answered {status})"
        ends = await asyncio.gather(*(wait_terminal(http, rid) for rid in ids))
    if any(kind != "succeeded" for kind, _ in ends):
        raise RuntimeError(f"a batch render did not succeed: {ends}")
    return max(at for _, at in ends) - started, how


async def baseline_batch(baseline: Baseline, rep: int, args: argparse.Namespace) -> float:
    items = [
        render_body(PROJECT, 1000 * rep + n, steps=args.steps, size=args.size) for n in range(args.batch)
    ]
    async with aiohttp.ClientSession(baseline.url, timeout=aiohttp.ClientTimeout(total=None)) as http:
        started = time.perf_counter()
        async with http.post("/render/batch", json={"items": items}) as answer:
            answer.raise_for_status()
            await answer.read()
        return time.perf_counter() - started


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    config = StackConfig.product_defaults(args.step_ms)
    async with renderflow(config) as target, Origin() as origin:
        database_url = target.database_url or os.environ.get("DATABASE_URL", "")
        if not database_url:
            raise SystemExit("with RENDERFLOW_BENCH_URL, DATABASE_URL must name the PostgreSQL it uses")
        async with session(target) as http:
            await ensure_project(http, PROJECT)
        async with Baseline(database_url, args.step_ms) as baseline:
            # Warm both (connections, first imports, first PNG encode) before anything is timed.
            await renderflow_requests(
                target, origin, -1, argparse.Namespace(**{**vars(args), "clients": 2, "per_client": 1})
            )
            await baseline_requests(
                baseline, origin, -1, argparse.Namespace(**{**vars(args), "clients": 2, "per_client": 1})
            )
            rf_accept: list[list[float]] = []
            rf_result: list[list[float]] = []
            bl_request: list[list[float]] = []
            rf_batch: list[float] = []
            bl_batch: list[float] = []
            how = ""
            for rep in range(args.reps):
                # Alternate who goes first, so that drift of the machine favours neither.
                order = ("rf", "bl") if rep % 2 == 0 else ("bl", "rf")
                for who in order:
                    if who == "rf":
                        accept, result = await renderflow_requests(target, origin, rep, args)
                        rf_accept.append(accept)
                        rf_result.append(result)
                        makespan, how = await renderflow_batch(target, rep, args)
                        rf_batch.append(makespan)
                    else:
                        bl_request.append(await baseline_requests(baseline, origin, rep, args))
                        if rep < args.baseline_batch_reps:
                            bl_batch.append(await baseline_batch(baseline, rep, args))
                print(
                    f"rep {rep + 1}/{args.reps}: batch makespan renderflow {rf_batch[-1]:.2f} s"
                    + (f", baseline {bl_batch[-1]:.2f} s" if rep < args.baseline_batch_reps else ""),
                    file=sys.stderr,
                    flush=True,
                )

    def p50s(runs: list[list[float]]) -> float:
        return median([latency_summary(r)["p50_ms"] for r in runs])

    def p99s(runs: list[list[float]]) -> float:
        return median([latency_summary(r)["p99_ms"] for r in runs])

    def flat(runs: list[list[float]]) -> list[float]:
        return [x for run in runs for x in run]

    return {
        "scenario": "baseline",
        "settings": {
            "reps": args.reps,
            "clients": args.clients,
            "per_client": args.per_client,
            "steps": args.steps,
            "step_ms": args.step_ms,
            "generation_s": args.steps * args.step_ms / 1000,
            "size": args.size,
            "origin_delay_s": args.origin_delay,
            "batch": args.batch,
            "renderflow": target.url if target.external else "started here (product defaults)",
        },
        "request_latency": {
            "renderflow_accept": {
                **latency_summary(flat(rf_accept)),
                "p50_ms": p50s(rf_accept),
                "p99_ms": p99s(rf_accept),
            },
            "renderflow_result": {
                **latency_summary(flat(rf_result)),
                "p50_ms": p50s(rf_result),
                "p99_ms": p99s(rf_result),
            },
            "baseline": {
                **latency_summary(flat(bl_request)),
                "p50_ms": p50s(bl_request),
                "p99_ms": p99s(bl_request),
            },
            "ratio_p50": ratio(p50s(rf_accept), p50s(bl_request)),
            "ratio_p99": ratio(p99s(rf_accept), p99s(bl_request)),
            "ratio_result_p50": ratio(p50s(rf_result), p50s(bl_request)),
        },
        "batch_makespan": {
            "renderflow_s": round(median(rf_batch), 3),
            "baseline_s": round(median(bl_batch), 3),
            "renderflow_reps_s": [round(x, 3) for x in rf_batch],
            "baseline_reps_s": [round(x, 3) for x in bl_batch],
            "ratio": ratio(median(rf_batch), median(bl_batch)),
            "renderflow_submitted_as": how,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--baseline-batch-reps", type=int, default=3, help="the baseline batch takes 16 s each"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=100.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--origin-delay", type=float, default=0.5, help="seconds the reference origin takes")
    json_argument(parser)
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    latency, batch = result["request_latency"], result["batch_makespan"]
    print(
        f"request latency p50: renderflow {latency['renderflow_accept']['p50_ms']:.1f} ms (202), "
        f"baseline {latency['baseline']['p50_ms']:.1f} ms -> ratio {latency['ratio_p50']}"
    )
    print(
        f"time to result p50: renderflow {latency['renderflow_result']['p50_ms']:.0f} ms, "
        f"baseline {latency['baseline']['p50_ms']:.0f} ms -> ratio {latency['ratio_result_p50']}"
    )
    print(
        f"batch of {args.batch} x {args.steps * args.step_ms / 1000:g} s: "
        f"renderflow {batch['renderflow_s']:.2f} s, "
        f"baseline {batch['baseline_s']:.2f} s -> ratio {batch['ratio']} ({batch['renderflow_submitted_as']})"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
