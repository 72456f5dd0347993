"""Faults of the object store under the whole stack: a real PostgreSQL, a real SeaweedFS S3 server
(stopped and started as a crash would), real gRPC services and the gateway on 127.0.0.1.

What is proven:

1. A store that is down while a client downloads a succeeded render's output: the gateway answers a
   typed problem (503, `unavailable`, with Retry-After) in bounded time, never a 500 nor a hang;
   once the store is back, the same request serves the whole output.
2. A store that is down while a worker stores an output: the worker waits for it within the
   attempt (RENDERFLOW_WORKER_STORE_OUTAGE_S), so a short outage spends no attempt; past that wait,
   the attempt fails with `store_failed` (retryable), the render goes back to the queue, and once
   the store is back it succeeds, its output readable through the gateway; nothing ends `failed`.
3. A worker process killed with SIGKILL while its multipart upload of a large video is pending:
   no object appears at the render's key, the gateway serves no half output, and once the dead
   worker's lease runs out a second worker process renders it again, whole (sha256 and size as the
   render says).
4. That 503 comes once the generation service has given up on the store, not after the gateway's
   channel has run the call again (its retry policy is for peers that never got a call)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import obstore
import pytest

from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from services.generation.object_store import MIN_PART_BYTES, ObjectStoreSettings, S3ArtifactStore
from shared.errors import Unavailable
from shared.service_auth import new_service_token
from tests.conftest import free_port
from tests.support.gateway_stack import LiveStack, assert_problem, running_on_bucket, running_stack
from tests.support.provider import Prediction, Provider
from tests.support.seaweedfs import SeaweedFS, serving_seaweedfs

REPO = Path(__file__).resolve().parents[2]
IMAGE = {"project": "art", "kind": "image", "prompt": "a fox", "params": {"width": 96, "height": 64}}
VIDEO = {
    "project": "art",
    "kind": "video",
    "prompt": "a harbour at dawn",
    "params": {"width": 96, "height": 64, "steps": 2, "duration_s": 1, "fps": 8},
}
BIG_VIDEO_PAD = 48 * 1024 * 1024
"""Bytes added to the video the provider serves: ten parts of S3's smallest size to upload."""
LEASE = {
    "RENDERFLOW_WORKER_LEASE_S": "2",
    "RENDERFLOW_WORKER_HEARTBEAT_S": "0.5",
    "RENDERFLOW_WORKER_RESCUE_S": "0.5",
    "RENDERFLOW_WORKER_POLL_S": "0.5",
}


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with serving_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


async def _visible_size(server: SeaweedFS, key: str) -> int | None:
    """The size of the object at `key` as any reader of the bucket sees it; None when there is none."""
    try:
        meta = await obstore.head_async(server.raw_client(), key)
    except FileNotFoundError:
        return None
    return meta["size"]


@contextlib.asynccontextmanager
async def store_down(server: SeaweedFS) -> AsyncIterator[None]:
    """The store is down inside; up again afterwards, whatever happened (the module shares it)."""
    await server.down()
    try:
        yield
    finally:
        if not server.running:
            await server.up()


async def render_events(
    stack: LiveStack, headers: dict[str, str], render_id: str
) -> AsyncGenerator[Any, None]:
    """The render's events from its SSE stream, from the first, until the terminal one ends it."""
    url = f"{stack.base}/v1/renders/{render_id}/events"
    async with stack.http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    yield json.loads("\n".join(data))
                data = []
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))


async def new_user(stack: LiveStack) -> dict[str, str]:
    headers = await stack.user(f"u{uuid.uuid4().hex[:8]}")
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    return headers


async def download(stack: LiveStack, headers: dict[str, str], render_id: str) -> tuple[int, str, bytes]:
    """The output as the gateway serves it: status, content type, body."""
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/output", headers=headers) as response:
        return response.status, response.content_type, await response.read()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_download_while_the_store_is_down_is_a_typed_503_then_served_once_it_is_back(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = seaweedfs.store_settings()
    async with running_on_bucket(database_url, tmp_path, bucket, "download-worker") as stack:
        alice = await new_user(stack)
        render = await stack.created("POST", "/v1/renders", {**alice, "Prefer": "wait=20"}, json=IMAGE)
        assert render["status"] == "succeeded", render
        output = render["output"]
        assert await _visible_size(seaweedfs, S3ArtifactStore(bucket).key(render["id"])) == output["bytes"]
        path = f"/v1/renders/{render['id']}/output"

        async with store_down(seaweedfs):
            started = time.monotonic()
            async with asyncio.timeout(20):
                response, body = await stack.call("GET", path, alice)
            elapsed = time.monotonic() - started
            assert_problem(response, body, 503, "unavailable")
            assert "artifact store" in body["detail"], body
            assert int(response.headers["Retry-After"]) >= 1
            # Bounded by RENDERFLOW_ARTIFACT_S3_RETRY_S (0.3 s) and the channel's few retries.
            assert elapsed < 10, f"the 503 took {elapsed:.1f} s"
            # A range is no different, and neither is a second try.
            ranged, body = await stack.call("GET", path, {**alice, "Range": "bytes=0-7"})
            assert_problem(ranged, body, 503, "unavailable")

        status, content_type, served = await download(stack, alice, render["id"])
    assert (status, content_type) == (200, "image/png"), served[:200]
    assert len(served) == output["bytes"] and hashlib.sha256(served).hexdigest() == output["sha256"]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_render_stored_while_the_store_is_down_is_retried_and_succeeds_once_it_is_back(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = seaweedfs.store_settings()
    # No waiting for the store within an attempt (RENDERFLOW_WORKER_STORE_OUTAGE_S=0), and attempts
    # to spare: the store may take a few seconds to come back, and each attempt while it is down
    # fails in about RENDERFLOW_ARTIFACT_S3_RETRY_S.
    async with running_on_bucket(
        database_url,
        tmp_path,
        bucket,
        "store-worker",
        store_outage_s=0.0,
        max_attempts=10,
        retry_base_s=0.2,
        retry_max_s=2.0,
    ) as stack:
        alice = await new_user(stack)
        events: list[Any] = []
        async with store_down(seaweedfs):
            submitted = await stack.created("POST", "/v1/renders", alice, json=IMAGE)
            render_id = submitted["id"]
            async with (
                asyncio.timeout(40),
                contextlib.aclosing(render_events(stack, alice, render_id)) as feed,
            ):
                async for event in feed:
                    events.append(event)
                    retried = event["type"] == "queued" and "store_failed" in event.get("message", "")
                    if retried and not seaweedfs.running:
                        await seaweedfs.up()  # the render is back in the queue: the store returns
        render = await stack.created("GET", f"/v1/renders/{render_id}", alice)
        status, content_type, served = await download(stack, alice, render_id)

    types = [event["type"] for event in events]
    assert types[-1] == "succeeded" and "failed" not in types, events
    assert render["status"] == "succeeded" and render["error"] is None, render
    retries = [
        e["message"] for e in events if e["type"] == "queued" and "store_failed" in e.get("message", "")
    ]
    assert retries, events
    assert re.match(r"attempt 1 failed \(store_failed: the artifact store is unavailable: ", retries[0])
    # Every attempt but the last failed to store, and each started afresh from the queue.
    assert render["attempts"] == len(retries) + 1 == types.count("started") >= 2, (render, events)
    output = render["output"]
    assert (status, content_type) == (200, "image/png")
    assert len(served) == output["bytes"] and hashlib.sha256(served).hexdigest() == output["sha256"]
    assert await _visible_size(seaweedfs, S3ArtifactStore(bucket).key(render_id)) == output["bytes"]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_short_store_outage_is_waited_for_within_the_attempt(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = seaweedfs.store_settings()
    async with running_on_bucket(
        database_url, tmp_path, bucket, "patient-worker", store_outage_s=30.0
    ) as stack:
        alice = await new_user(stack)
        events: list[Any] = []
        async with store_down(seaweedfs):
            submitted = await stack.created("POST", "/v1/renders", alice, json=IMAGE)
            async with (
                asyncio.timeout(40),
                contextlib.aclosing(render_events(stack, alice, submitted["id"])) as feed,
            ):
                async for event in feed:
                    events.append(event)
                    storing = event["type"] == "phase" and event.get("phase") == "store"
                    if storing and not seaweedfs.running:
                        await seaweedfs.up()  # the worker holds the render, waiting for the store
        render = await stack.created("GET", f"/v1/renders/{submitted['id']}", alice)

    types = [event["type"] for event in events]
    assert types[-1] == "succeeded" and types.count("started") == 1 and "queued" not in types[1:], events
    assert render["attempts"] == 1 and render["status"] == "succeeded", render
    assert (
        await _visible_size(seaweedfs, S3ArtifactStore(bucket).key(render["id"])) == render["output"]["bytes"]
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_download_while_the_store_is_down_waits_out_the_stores_retries_once(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = replace(seaweedfs.store_settings(), retry_s=1.0)
    async with running_on_bucket(database_url, tmp_path, bucket, "budget-worker") as stack:
        alice = await new_user(stack)
        render = await stack.created("POST", "/v1/renders", {**alice, "Prefer": "wait=20"}, json=IMAGE)
        assert render["status"] == "succeeded", render
        async with store_down(seaweedfs):
            # How long the store itself takes to give up (RENDERFLOW_ARTIFACT_S3_RETRY_S and a little).
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await S3ArtifactStore(bucket).size(render["id"])
            store_s = time.monotonic() - started
            started = time.monotonic()
            response, body = await stack.call("GET", f"/v1/renders/{render['id']}/output", alice)
            gateway_s = time.monotonic() - started
    assert_problem(response, body, 503, "unavailable")
    # The generation service has already retried the store for its whole budget: the 503 should
    # follow at once, not after the gateway's channel has run the call three more times.
    assert gateway_s < 2 * store_s, f"the 503 took {gateway_s:.1f} s; the store gave up in {store_s:.1f} s"


class BigVideoProvider(Provider):
    """The fake prediction API, whose every prediction succeeds at once with `video`."""

    def __init__(self, video: bytes) -> None:
        super().__init__()
        self.video = video

    async def _end(self, prediction: Prediction) -> None:
        prediction.status, prediction.output, prediction.content_type = "succeeded", self.video, "video/mp4"


async def big_video() -> bytes:
    """A real H.264 MP4 of the procedural backend, made large by a top-level `free` box of noise
    (which players and ffmpeg skip): an upload of many parts."""

    async def ignore(step: int, total: int) -> None:
        pass

    job = GenerationInput("big", "video", "a harbour at dawn", "", 96, 64, 2, 7, duration_s=1.0, fps=8)
    video = (await ProceduralBackend().generate(job, ignore)).data
    return video + struct.pack(">I4s", 8 + BIG_VIDEO_PAD, b"free") + os.urandom(BIG_VIDEO_PAD)


class WorkerProcesses:
    """`python -m services.generation.worker` processes on the stack's database, storing in the
    bucket and rendering videos with the http backend; each one killed at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("RENDERFLOW_", "AWS_", "DATABASE_URL"))
        }
        self._env = {**inherited, **env}
        self._logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        index = len(self.processes)
        env = {**self._env, "RENDERFLOW_WORKER_ID": f"process-{index}"}
        with (self._logs / f"worker-{index}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.generation.worker"], cwd=REPO, env=env, stderr=log
            )
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()


def worker_env(
    database_url: str, tmp_path: Path, bucket: ObjectStoreSettings, provider: Provider
) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "RENDERFLOW_RUN_DIR": str(tmp_path / "run"),
        "RENDERFLOW_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
        "RENDERFLOW_IMAGEFETCH_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_LOG_LEVEL": "WARNING",
        "RENDERFLOW_WORKER_CONCURRENCY": "1",
        **LEASE,
        "RENDERFLOW_BACKEND_VIDEO": "http",
        "RENDERFLOW_BACKEND_HTTP_URL": provider.url,
        "RENDERFLOW_BACKEND_HTTP_POLL_S": "0.02",
        "RENDERFLOW_ARTIFACT_S3_BUCKET": bucket.bucket,
        "RENDERFLOW_ARTIFACT_S3_ENDPOINT": bucket.endpoint,
        "RENDERFLOW_ARTIFACT_S3_PREFIX": bucket.prefix,
        "RENDERFLOW_ARTIFACT_S3_PART_BYTES": str(MIN_PART_BYTES),
        "RENDERFLOW_ARTIFACT_S3_RETRY_S": "0.3",
        "AWS_ACCESS_KEY_ID": bucket.access_key_id or "",
        "AWS_SECRET_ACCESS_KEY": bucket.secret_access_key or "",
    }


async def new_pending_upload(seaweedfs: SeaweedFS, before: set[str], process: subprocess.Popen[bytes]) -> str:
    """The multipart upload begun since `before` was seen, once there is one (the server announces
    none: its list of uploads is looked at every few milliseconds)."""
    async with asyncio.timeout(30):
        while True:
            begun = set(await seaweedfs.pending_uploads()) - before
            if begun:
                return begun.pop()
            assert process.poll() is None, "the worker exited before it uploaded"
            await asyncio.sleep(0.002)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_worker_killed_mid_upload_leaves_no_half_output_and_another_stores_it_whole(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = seaweedfs.store_settings()
    store = S3ArtifactStore(bucket)  # where the render's object is
    video = await big_video()
    async with (
        BigVideoProvider(video) as provider,
        running_stack(database_url, tmp_path, generation_changes={"artifact_s3": bucket}) as stack,
    ):
        workers = WorkerProcesses(worker_env(database_url, tmp_path, bucket, provider), tmp_path)
        try:
            alice = await new_user(stack)
            before = set(await seaweedfs.pending_uploads())
            doomed = workers.spawn()
            render_id = (await stack.created("POST", "/v1/renders", alice, json=VIDEO))["id"]
            upload = await new_pending_upload(seaweedfs, before, doomed)
            doomed.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert await asyncio.wait_for(asyncio.to_thread(doomed.wait), 5) == -signal.SIGKILL

            # Cut mid-upload: the upload is neither completed nor aborted, and readers see nothing.
            assert upload in await seaweedfs.pending_uploads()
            assert await _visible_size(seaweedfs, store.key(render_id)) is None
            running = await stack.created("GET", f"/v1/renders/{render_id}", alice)
            assert (running["status"], running["output"]) == ("running", None), running
            response, body = await stack.call("GET", f"/v1/renders/{render_id}/output", alice)
            assert_problem(response, body, 409, "conflict")

            workers.spawn()  # rescues the render once the dead worker's lease (2 s) runs out
            events = []
            async with (
                asyncio.timeout(30),
                contextlib.aclosing(render_events(stack, alice, render_id)) as feed,
            ):
                async for event in feed:
                    events.append(event)
            recovered_s = time.monotonic() - killed_at
        finally:
            workers.kill_all()
        render = await stack.created("GET", f"/v1/renders/{render_id}", alice)
        status, content_type, served = await download(stack, alice, render_id)

    assert render["status"] == "succeeded" and render["attempts"] == 2, render
    types = [event["type"] for event in events]
    assert types.count("succeeded") == 1 and "failed" not in types, events
    lost = [
        e["message"]
        for e in events
        if e["type"] == "queued" and "stopped renewing its lease" in e.get("message", "")
    ]
    assert lost and "worker process-0" in lost[0], events
    output = render["output"]
    assert (output["bytes"], output["sha256"]) == (len(video), hashlib.sha256(video).hexdigest())
    assert (status, content_type) == (200, "video/mp4")
    assert len(served) == output["bytes"] and hashlib.sha256(served).hexdigest() == output["sha256"]
    assert await _visible_size(seaweedfs, store.key(render_id)) == len(video)
    # The dead worker's parts stay behind, invisible, for the bucket's lifecycle rule.
    assert upload in await seaweedfs.pending_uploads()
    assert recovered_s < 20, f"the render took {recovered_s:.1f} s to be rendered again"
