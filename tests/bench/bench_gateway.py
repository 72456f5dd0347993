"""Benchmark of the gateway's read path: authenticated `GET /v1/projects/{slug}` (API key from the
gateway's cache, one metadata RPC, one PostgreSQL query) at a fixed number of concurrent clients;
prints the median and p99 latency and the requests per second.

The stack runs as real processes, as in production (PostgreSQL, metadata, imagefetch, generation,
a worker and the gateway, under the supervisor; `tests/chaos/stack.py`), with the shipped settings;
the load generator is this process (aiohttp, one keep-alive connection per client). Set
`RENDERFLOW_BENCH_URL` and `RENDERFLOW_BENCH_KEY` to measure a gateway already running instead.

    .venv/bin/python -m tests.bench.bench_gateway [--clients 32] [--requests 10000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import time
from typing import Any

import aiohttp

from tests.bench.figures import json_argument, latency_summary, write_json
from tests.bench.rfclient import ensure_project, renderflow, session
from tests.chaos.stack import StackConfig

PROJECT = "bench-read"
WARMUP = 500


async def _drive(
    http: aiohttp.ClientSession, path: str, clients: int, requests: int
) -> tuple[list[float], float]:
    """`requests` GETs of `path` by `clients` concurrent clients; the latencies (ms) and wall time (s)."""
    latencies: list[float] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with http.get(path) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: {response.status}")
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


async def bench(clients: int, requests: int) -> dict[str, Any]:
    async with (
        renderflow(StackConfig.product_defaults(step_ms=0.0, workers=1)) as target,
        session(target, limit=clients) as http,
    ):
        await ensure_project(http, PROJECT)
        path = f"/v1/projects/{PROJECT}"
        await _drive(http, path, clients, WARMUP)  # connections open, caches and pools warm
        latencies, wall_s = await _drive(http, path, clients, requests)
    summary = latency_summary(latencies)
    return {
        "target": "external" if target.external else "local processes",
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(requests / wall_s, 1),
        **{k: v for k, v in summary.items() if k != "samples_ms"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests measured (default 10000)")
    json_argument(parser)
    args = parser.parse_args()
    result = asyncio.run(bench(args.clients, args.requests))
    print(
        f"GET /v1/projects/{{slug}}, authenticated, {result['clients']} concurrent clients, "
        f"{result['requests']} requests ({result['target']}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}):\n"
        f"  median {result['p50_ms']:.2f} ms   p90 {result['p90_ms']:.2f} ms   "
        f"p99 {result['p99_ms']:.2f} ms   max {result['max_ms']:.2f} ms\n"
        f"  {result['requests_per_s']:.0f} requests/s over {result['wall_s']:.1f} s\n"
        f"reproduce: .venv/bin/python -m tests.bench.bench_gateway {shlex.join(sys.argv[1:])}".rstrip()
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
