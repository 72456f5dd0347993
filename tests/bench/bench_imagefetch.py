"""Benchmark of the image-fetch service through gRPC: cache-hit latency, single-flight under 100
concurrent identical fetches, and the worst wall time of a fetch against hanging origins.

    .venv/bin/python -m tests.bench.bench_imagefetch [--hits 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.imagefetch.config import Settings
from services.imagefetch.server import running
from shared.grpc_client import create_channel
from shared.url_guard import parse_allow_list
from tests.support.origin import Origin

HANGING = ("/hang-headers", "/hang-body", "/drip")


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(hits: int, hangs_per_route: int) -> None:
    # Production defaults (5 s deadline, 3 s read timeout, 3 attempts), loopback allow-listed.
    settings = Settings(listen="127.0.0.1:0", allow=parse_allow_list(["127.0.0.1"]))
    async with (
        Origin() as origin,
        running(settings) as port,
        create_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)

        for label, path in (("small PNG", "/image/hit"), ("200 KiB PNG", "/image/hit-big?big=1")):
            request = imagefetch_pb2.FetchRequest(url=origin.url(path))
            warm = await stub.Fetch(request)
            assert warm.WhichOneof("outcome") == "image"
            for _ in range(50):
                await stub.Fetch(request)
            latencies = []
            for _ in range(hits):
                started = time.perf_counter()
                result = await stub.Fetch(request)
                latencies.append((time.perf_counter() - started) * 1000)
                assert result.cache_hit
            print(
                f"cache hit via gRPC ({label}, {result.image.size_bytes} B, n={hits}): "
                f"p50 {statistics.median(latencies):.3f} ms, p99 {_percentile(latencies, 0.99):.3f} ms"
            )

        url = origin.url("/slow/flight?delay=0.5")
        results = await asyncio.gather(
            *(stub.Fetch(imagefetch_pb2.FetchRequest(url=url)) for _ in range(100))
        )
        delivered = sum(r.WhichOneof("outcome") == "image" for r in results)
        print(
            f"100 concurrent identical fetches: {origin.hits['/slow/flight']} origin request(s), "
            f"{delivered}/100 got the bytes"
        )

        async def timed(path: str, n: int) -> tuple[float, str]:
            started = time.perf_counter()
            result = await stub.Fetch(imagefetch_pb2.FetchRequest(url=origin.url(f"{path}?n={n}")))
            return time.perf_counter() - started, result.failure.reason

        outcomes = await asyncio.gather(*(timed(path, n) for path in HANGING for n in range(hangs_per_route)))
        worst = max(wall for wall, _ in outcomes)
        reasons = sorted({reason for _, reason in outcomes})
        print(
            f"hanging origins ({', '.join(HANGING)}; {len(outcomes)} fetches, deadline "
            f"{settings.deadline_s:g} s): worst wall time {worst:.3f} s, reasons {reasons}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hits", type=int, default=2000, help="cache hits timed per image size")
    parser.add_argument("--hangs", type=int, default=10, help="fetches per hanging route")
    args = parser.parse_args()
    asyncio.run(bench(args.hits, args.hangs))


if __name__ == "__main__":
    main()
