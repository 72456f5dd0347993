"""Event streams under load: 50 renders (20 steps of 50 ms each; the product's other settings, 2
workers of 4 slots) submitted at once, then each followed on its own SSE stream to its end, the 50
streams opening 20 ms apart (so that each connects while the others are open), then again all at
the same instant.

- connect -> first event: from a stream's request to its first event (its replay);
- event -> client: from an event's time in the log (its row's `at`, stamped before the commit
  that publishes it) to its arrival at the client, for every event of every stream: the commit,
  the NOTIFY, generation's hub, the Watch stream, the gateway and SSE.

Both clocks are this machine's.

    .venv/bin/python -m tests.bench.bench_streams [--streams 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.figures import json_argument, percentile, write_json
from tests.bench.rfclient import TERMINAL, ensure_project, render_body, submit
from tests.chaos.stack import StackConfig, running_stack

PROJECT = "streams"
STEPS = 20
STEP_MS = 50.0
STAGGER_S = 0.02
"""Streams open 20 ms apart: the 50 renders last several seconds on 8 slots, so the streams are
open together while the others connect."""


def _summary(samples_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(samples_ms),
        "p50_ms": round(percentile(samples_ms, 0.5), 2),
        "p99_ms": round(percentile(samples_ms, 0.99), 2),
        "max_ms": round(max(samples_ms, default=0.0), 2),
    }


async def follow(http: aiohttp.ClientSession, render_id: str) -> tuple[float, list[float]]:
    """Follows a render's stream to its end: connect -> first event (ms), and the lag behind the
    log (ms) of each event written after the stream opened (those before are its replay)."""
    lags: list[float] = []
    first: float | None = None
    opened_at = time.time()
    connecting = time.perf_counter()
    async with http.get(f"/v1/renders/{render_id}/events") as stream:
        if stream.status != 200:
            raise RuntimeError(f"GET events: {stream.status} {await stream.text()}")
        kind = ""
        async for raw in stream.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
                if first is None:
                    first = (time.perf_counter() - connecting) * 1000
            elif line.startswith("data:"):
                at = datetime.fromisoformat(json.loads(line.partition(":")[2])["at"]).timestamp()
                if at > opened_at:
                    lags.append((time.time() - at) * 1000)
                if kind in TERMINAL:
                    break
    if first is None:
        raise RuntimeError(f"no event on the stream of {render_id}")
    return first, lags


async def bench(streams: int) -> dict[str, Any]:
    config = StackConfig.product_defaults(STEP_MS)
    with tempfile.TemporaryDirectory(prefix="renderflow-streams-") as workdir:
        async with running_stack(Path(workdir), config) as stack:
            headers = {"Authorization": f"Bearer {stack.api_key}"}
            timeout = aiohttp.ClientTimeout(total=300)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(
                stack.url, headers=headers, timeout=timeout, connector=connector
            ) as http:
                await ensure_project(http, PROJECT)
                body = render_body(PROJECT, 0, steps=STEPS, size=64)
                await follow(http, (await submit(http, body))[0])  # warm-up
                staggered = await _run(http, streams, STAGGER_S)
                at_once = await _run(http, streams, 0.0)
    return {
        "scenario": "streams",
        "settings": {"streams": streams, "steps": STEPS, "step_ms": STEP_MS, "stagger_s": STAGGER_S},
        "connect_to_first_event": _summary([first for first, _ in staggered]),
        "event_to_client": _summary([lag for _, lags in staggered for lag in lags]),
        "connect_to_first_event_all_at_once": _summary([first for first, _ in at_once]),
    }


async def _run(
    http: aiohttp.ClientSession, streams: int, stagger_s: float
) -> list[tuple[float, list[float]]]:
    """Submits `streams` renders at once, then follows each on its own stream, the streams opening
    `stagger_s` apart (0: all at the same instant)."""
    submitted = await asyncio.gather(
        *(submit(http, render_body(PROJECT, n, steps=STEPS, size=64)) for n in range(streams))
    )

    async def client(n: int, render_id: str) -> tuple[float, list[float]]:
        await asyncio.sleep(n * stagger_s)
        return await follow(http, render_id)

    return await asyncio.gather(*(client(n, render_id) for n, (render_id, _) in enumerate(submitted)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=50)
    json_argument(parser)
    args = parser.parse_args()
    result = asyncio.run(bench(args.streams))
    for name in ("connect_to_first_event", "event_to_client", "connect_to_first_event_all_at_once"):
        figures = result[name]
        print(
            f"{name:<24} n={figures['n']:<5} p50 {figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms"
        )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
