"""Benchmark of the gateway's render API against the local stack (its services as separate
processes, as `renderflow run` starts them), in this order:

- submit -> succeeded of a 512x512 image (procedural backend, no step latency) on an idle queue,
  through `Prefer: wait=60`;
- submit -> first SSE event of the render (p50/p99 over 100 renders), and SSE connect -> first event;
- submits per second, p50/p99 latency and errors at 1, 16 and 64 concurrent clients (300, 1000
  and 2000 submits, or fewer if a level takes longer than `--max-level-s`), twice: on a stack
  without workers (`submit`: the submit path alone, as the bare chain it is compared with does no
  render either), then on the stack as shipped (`submit_with_workers`: the workers run the renders
  meanwhile, on the same two cores, as they would not in a cluster). The server-side phases come
  from each answer's Server-Timing.

    .venv/bin/python -m tests.bench.bench_submit [--json OUT] [--scale 0.5] [--max-level-s 20]

With RENDERFLOW_BENCH_URL and RENDERFLOW_BENCH_KEY set it measures that gateway instead; else it
starts the stack in a temporary directory with the shipped settings, but without the per-key
submit rate limit (one key sends as fast as it can). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.figures import json_argument, latency_summary, percentile, write_json
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

PROJECT = "bench-submit"
LEVELS = ((1, 300), (16, 1000), (64, 2000))
FIRST_EVENT_RENDERS = 100
LARGE_RENDERS = 10
WARM_UP = 50
LEVEL_WARMUP_S = 0.5
"""Each level's first half second is not counted, as in the ceilings' runs (tests.bench.loadgen)."""


def _summary(samples_ms: list[float]) -> dict[str, Any]:
    summary = latency_summary(samples_ms)
    del summary["samples_ms"]
    return summary


def server_timing(header: str) -> dict[str, float]:
    """`auth;dur=0.12, db;dur=3.4` as {phase: milliseconds}."""
    phases: dict[str, float] = {}
    for entry in header.split(","):
        name, _, rest = entry.strip().partition(";dur=")
        if name and rest:
            phases[name] = float(rest)
    return phases


async def _timed_submit(
    http: aiohttp.ClientSession, body: dict[str, Any], phases: dict[str, list[float]]
) -> float | None:
    """Milliseconds to the 202 (None for any other answer); adds the gateway's phases to `phases`."""
    started = time.perf_counter()
    try:
        async with http.post("/v1/renders", json=body) as answer:
            await answer.read()
            accepted = answer.status == 202
            timing = answer.headers.get("Server-Timing", "")
    except aiohttp.ClientError:
        return None
    if not accepted:
        return None
    for name, ms in server_timing(timing).items():
        phases.setdefault(name, []).append(ms)
    return (time.perf_counter() - started) * 1000


async def submit_level(
    target: Target, clients: int, count: int, max_s: float, warmup_s: float = LEVEL_WARMUP_S
) -> dict[str, Any]:
    """`count` submits from `clients` concurrent clients, each on its own keep-alive connection,
    after `warmup_s` of submits that are not counted (the level's connections opened, the load
    steady: the ceilings are measured the same way); fewer when `max_s` seconds pass first (a
    machine busy with other work)."""
    latencies: list[float] = []
    phases: dict[str, list[float]] = {}
    numbers = iter(range(count))
    warm_up = iter(range(count, 10**9))
    sent = 0

    async def client(http: aiohttp.ClientSession, measure_from: float, deadline: float) -> None:
        nonlocal sent
        while (now := time.perf_counter()) < measure_from:
            await _timed_submit(http, render_body(PROJECT, next(warm_up), steps=1, size=64), {})
        for n in numbers:  # shared: each submit is taken by whichever client is free
            if now > deadline:
                return
            sent += 1
            elapsed = await _timed_submit(http, render_body(PROJECT, n, steps=1, size=64), phases)
            if elapsed is not None:
                latencies.append(elapsed)
            now = time.perf_counter()

    async with session(target, limit=clients) as http:
        measure_from = time.perf_counter() + warmup_s
        await asyncio.gather(*(client(http, measure_from, measure_from + max_s) for _ in range(clients)))
        wall_s = time.perf_counter() - measure_from
    return {
        "clients": clients,
        "submits": sent,
        "errors": sent - len(latencies),
        "wall_s": round(wall_s, 3),
        "per_s": round(sent / wall_s, 1),
        **_summary(latencies),
        "server_timing_p50_ms": {name: round(percentile(ms, 0.5), 3) for name, ms in phases.items()},
    }


async def first_events(http: aiohttp.ClientSession, renders: int) -> dict[str, Any]:
    """Submit, then open the render's event stream: time from the submit (and from the stream's
    request) to its first event. The client leaves right after, as a page that got its answer."""
    from_submit: list[float] = []
    from_connect: list[float] = []
    for n in range(renders):
        started = time.perf_counter()
        render_id, _ = await submit(http, render_body(PROJECT, n, steps=1, size=64))
        connecting = time.perf_counter()
        async with http.get(f"/v1/renders/{render_id}/events") as stream:
            if stream.status != 200:
                raise RuntimeError(f"GET events: {stream.status}")
            async for line in stream.content:
                if line.startswith(b"event:"):
                    break
        arrived = time.perf_counter()
        from_submit.append((arrived - started) * 1000)
        from_connect.append((arrived - connecting) * 1000)
    return {"submit_to_first_event": _summary(from_submit), "connect_to_first_event": _summary(from_connect)}


async def large_renders(http: aiohttp.ClientSession, renders: int) -> dict[str, Any]:
    """Submit -> succeeded of 512x512 images (20 steps) on an idle queue, via `Prefer: wait=60`."""
    samples: list[float] = []
    for n in range(renders):
        started = time.perf_counter()
        body = render_body(PROJECT, n, steps=20, size=512)
        async with http.post("/v1/renders", json=body, headers={"Prefer": "wait=60"}) as answer:
            render = await answer.json()
            if answer.status != 200 or render["status"] != "succeeded":
                raise RuntimeError(f"the 512x512 render did not succeed in time: {answer.status} {render}")
        samples.append((time.perf_counter() - started) * 1000)
    return _summary(samples)


async def _levels(target: Target, scale: float, max_level_s: float) -> list[dict[str, Any]]:
    return [await submit_level(target, c, max(c, round(n * scale)), max_level_s) for c, n in LEVELS]


async def bench(scale: float, max_level_s: float, json_path: Path | None) -> None:
    config = StackConfig.product_defaults(step_ms=0.0)
    external = bool(os.environ.get("RENDERFLOW_BENCH_URL"))
    alone: list[dict[str, Any]] = []
    if not external:  # a stack of ours: the same stack without workers first
        async with renderflow(replace(config, workers=0)) as target:
            async with session(target) as http:
                await ensure_project(http, PROJECT)
                for n in range(WARM_UP):
                    await submit(http, render_body(PROJECT, n, steps=1, size=64))
            alone = await _levels(target, scale, max_level_s)
    async with renderflow(config) as target:
        async with session(target) as http:
            await ensure_project(http, PROJECT)
            for n in range(WARM_UP):  # connections, caches, the queue's first pages
                last, _ = await submit(http, render_body(PROJECT, n, steps=1, size=64))
            await wait_terminal(http, last)  # the queue is idle again
            large = await large_renders(http, LARGE_RENDERS)
            first = await first_events(http, max(10, round(FIRST_EVENT_RENDERS * scale)))
        with_workers = await _levels(target, scale, max_level_s)
    results = {
        "target": "external" if target.external else "local stack (separate processes)",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "stack": {"workers": config.workers, "worker_concurrency": config.worker_concurrency, "step_ms": 0},
        "to_succeeded_512": large,
        **first,
        "submit": alone or with_workers,
        "submit_with_workers": with_workers,
    }
    _print(results)
    write_json(json_path, results)


def _print(results: dict[str, Any]) -> None:
    stack = results["stack"]
    print(
        f"Renderflow render API: {results['target']}, {results['cpus']} CPUs "
        f"(load average {results['load_average_1m']:g} at the end), "
        f"{stack['workers']} workers x {stack['worker_concurrency']}, procedural backend, no step latency"
    )
    for label, key in (
        ("submit -> succeeded, 512x512 image", "to_succeeded_512"),
        ("submit -> first SSE event", "submit_to_first_event"),
        ("SSE connect -> first event", "connect_to_first_event"),
    ):
        figures = results[key]
        n, p50, p99 = figures["n"], figures["p50_ms"], figures["p99_ms"]
        print(f"  {label:<36} n={n:<4} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms")
    for key, title in (("submit", "without workers"), ("submit_with_workers", "with the workers running")):
        print(f"  submits, {title}:")
        _print_levels(results[key])


def _print_levels(levels: list[dict[str, Any]]) -> None:
    head = ("clients", "submits", "errors", "req/s", "p50 ms", "p99 ms")
    print("  " + " ".join(f"{name:>8}" for name in head) + "   server-side p50 ms")
    for level in levels:
        inside = " ".join(f"{name} {ms:.2f}" for name, ms in level["server_timing_p50_ms"].items())
        print(
            f"  {level['clients']:>8} {level['submits']:>8} {level['errors']:>8} {level['per_s']:>8.1f} "
            f"{level['p50_ms']:>8.2f} {level['p99_ms']:>8.2f}   {inside}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the number of requests (default 1)"
    )
    parser.add_argument(
        "--max-level-s", type=float, default=20.0, help="end a concurrency level after this long (default 20)"
    )
    json_argument(parser)
    args = parser.parse_args()
    asyncio.run(bench(args.scale, args.max_level_s, args.json))


if __name__ == "__main__":
    main()
