"""How stale another process's view of projects, chains and rules can be: the lag of metadata's
change feed, from a change acknowledged to a client (`PATCH` of a rule answered by the gateway) to
the change reaching a subscriber of `WatchChanges` — what generation's catalog follows to drop what
it cached. (Submits through the gateway that made the change never see it stale: they carry its
seq.) The stack runs as real processes with the shipped settings (`tests/chaos/stack.py`).

    .venv/bin/python -m tests.bench.bench_feed [--changes 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from renderflow.v1 import metadata_pb2, metadata_pb2_grpc

from shared.grpc_client import create_channel
from shared.settings import Addresses, Env
from tests.bench.figures import json_argument, latency_summary, write_json
from tests.bench.rfclient import ensure_project
from tests.chaos.stack import StackConfig, running_stack

PROJECT = "bench-feed"


async def bench(changes: int) -> dict[str, Any]:
    config = StackConfig.product_defaults(0.0, workers=0)
    with tempfile.TemporaryDirectory(prefix="renderflow-feed-") as workdir:
        async with running_stack(Path(workdir), config) as stack:
            auth = {"Authorization": f"Bearer {stack.api_key}"}
            token = stack.env["RENDERFLOW_SERVICE_TOKEN"]
            address = Addresses.from_env(Env(stack.env)).metadata
            async with (
                aiohttp.ClientSession(stack.url, headers=auth) as http,
                create_channel(address, token=token) as channel,
            ):
                await ensure_project(http, PROJECT)
                async with http.post(f"/v1/projects/{PROJECT}/rules", json={"text": "v0"}) as answer:
                    rule_id = (await answer.json())["id"]
                arrivals: asyncio.Queue[float] = asyncio.Queue()  # one per change of the rule
                call = metadata_pb2_grpc.MetadataServiceStub(channel).WatchChanges(
                    metadata_pb2.WatchChangesRequest(after_seq=-1)
                )
                await call.initial_metadata()  # subscribed: nothing from here on is missed

                async def receive() -> None:
                    async for change in call:
                        if change.entity_id == rule_id:
                            arrivals.put_nowait(time.perf_counter())

                receiver = asyncio.create_task(receive())
                lags_ms: list[float] = []
                try:
                    for n in range(1, changes + 1):
                        async with http.patch(
                            f"/v1/projects/{PROJECT}/rules/{rule_id}", json={"text": f"v{n}"}
                        ) as answer:
                            answer.raise_for_status()
                        acknowledged = time.perf_counter()
                        arrived = await asyncio.wait_for(arrivals.get(), 10)
                        # Often there before the client has read the answer: no lag at all.
                        lags_ms.append(max(0.0, (arrived - acknowledged) * 1000))
                finally:
                    receiver.cancel()
                    call.cancel()
    summary = latency_summary(lags_ms)
    return {"changes": changes, **{k: v for k, v in summary.items() if k != "samples_ms"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=200, help="rule changes measured (default 200)")
    json_argument(parser)
    args = parser.parse_args()
    result = asyncio.run(bench(args.changes))
    print(
        f"change feed lag, change acknowledged -> delivered to a subscriber, {result['changes']} changes:\n"
        f"  p50 {result['p50_ms']:.2f} ms   p99 {result['p99_ms']:.2f} ms   max {result['max_ms']:.2f} ms"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
