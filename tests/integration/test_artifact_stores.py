"""The artifact stores against one contract, a directory (LocalArtifactStore) and a bucket of a real
S3 server (S3ArtifactStore on SeaweedFS, started once for the module): writes replace whole, reads
come in 64 KiB chunks and ranges, a missing output is NotFound. Then what only the bucket has:
uploads in parts that hold no second copy, a store that goes down (Unavailable, and nothing
half-stored), presigned URLs, local copies of an output for ffmpeg; and its settings."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import obstore
import psutil
import pytest
from PIL import Image

from services.generation.artifacts import CHUNK, LocalArtifactStore
from services.generation.backends import GenerationInput
from services.generation.backends.procedural import ProceduralBackend
from services.generation.backends.video import last_frame
from services.generation.object_store import MIN_PART_BYTES, ObjectStoreSettings, S3ArtifactStore
from shared.errors import NotFound, Unavailable, ValidationFailed
from shared.settings import ConfigError, Env
from tests.support.gateway_stack import running_on_bucket
from tests.support.seaweedfs import SeaweedFS, serving_seaweedfs

Store = LocalArtifactStore | S3ArtifactStore

IMAGE = GenerationInput("art-image", "image", "a calm harbour", "", 96, 64, 4, 7)
VIDEO = replace(IMAGE, render_id="art-video", kind="video", steps=3, duration_s=1.5, fps=8)
BIG = 40 * 1024 * 1024
"""A video-sized output: eight parts of S3's smallest size."""
HUGE = 4 * BIG
"""A file larger than what any copy of it in memory could hide in."""
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with serving_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
async def outputs() -> dict[str, tuple[bytes, str]]:
    """A real PNG and a real H.264 MP4 from the procedural backend, by kind: bytes, content type."""

    async def ignore(step: int, total: int) -> None:
        pass

    made = {}
    for job in (IMAGE, VIDEO):
        artifact = await ProceduralBackend().generate(job, ignore)
        made[job.kind] = (artifact.data, artifact.content_type)
    return made


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    return S3ArtifactStore(request.getfixturevalue("seaweedfs").store_settings())


@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> S3ArtifactStore:
    return S3ArtifactStore(seaweedfs.store_settings())


def new_id() -> str:
    return f"r{uuid.uuid4().hex}"


async def chunks_of(store: Store, render_id: str, offset: int = 0, length: int = 0) -> list[bytes]:
    return [chunk async for chunk in store.read(render_id, offset, length)]


# The contract: both stores.


async def test_an_output_is_read_back_whole_in_chunks_and_in_ranges(store: Store) -> None:
    render_id = new_id()
    data = os.urandom(CHUNK * 2 + 100)
    stored = await store.put(render_id, data)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await store.size(render_id) == len(data)
    chunks = await chunks_of(store, render_id)
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, 100] and b"".join(chunks) == data
    assert await store.get(render_id) == data
    for offset, length in [(CHUNK - 5, 10), (1, 0), (CHUNK, CHUNK), (len(data) - 1, 0), (10, 10**9), (0, 1)]:
        expected = data[offset : offset + length] if length else data[offset:]
        assert b"".join(await chunks_of(store, render_id, offset, length)) == expected, (offset, length)
    assert [len(c) for c in await chunks_of(store, render_id, 7, CHUNK + 1)] == [CHUNK, 1]
    assert await chunks_of(store, render_id, offset=len(data)) == []


async def test_ranges_beyond_the_end_or_negative_are_refused(store: Store) -> None:
    render_id = new_id()
    await store.put(render_id, b"12345")
    with pytest.raises(ValidationFailed, match="beyond the end"):
        await chunks_of(store, render_id, offset=6)
    with pytest.raises(ValidationFailed):
        await chunks_of(store, render_id, offset=-1)
    with pytest.raises(ValidationFailed):
        await chunks_of(store, render_id, length=-1)


async def test_an_empty_output(store: Store) -> None:
    render_id = new_id()
    stored = await store.put(render_id, b"")
    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await store.size(render_id) == 0
    assert await store.get(render_id) == b""
    assert await chunks_of(store, render_id) == []
    assert await chunks_of(store, render_id, 0, 5) == []
    with pytest.raises(ValidationFailed):
        await chunks_of(store, render_id, offset=1)


async def test_a_second_write_replaces_the_first_whole(store: Store) -> None:
    render_id = new_id()
    await store.put(render_id, os.urandom(CHUNK * 3))
    await store.put(render_id, b"second")
    assert await store.get(render_id) == b"second"
    assert await store.size(render_id) == 6
    longer = os.urandom(CHUNK + 1)
    await store.put(render_id, longer)
    assert b"".join(await chunks_of(store, render_id)) == longer


async def test_a_missing_output_is_not_found_and_deleting_it_is_harmless(store: Store) -> None:
    render_id = new_id()
    with pytest.raises(NotFound):
        await store.size(render_id)
    with pytest.raises(NotFound):
        await store.get(render_id)
    with pytest.raises(NotFound):
        await chunks_of(store, render_id, 10, 10)
    await store.delete(render_id)


async def test_a_deleted_output_is_not_found(store: Store) -> None:
    render_id = new_id()
    await store.put(render_id, b"soon gone")
    await store.delete(render_id)
    with pytest.raises(NotFound):
        await store.get(render_id)
    with pytest.raises(NotFound):
        await chunks_of(store, render_id)
    await store.delete(render_id)


async def test_ids_that_are_not_render_ids_are_refused(store: Store) -> None:
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            await store.put(bad, b"x")
        with pytest.raises(ValueError):
            await store.get(bad)


@pytest.mark.parametrize("kind", ["image", "video"])
async def test_a_png_and_an_mp4_round_trip(
    store: Store, outputs: dict[str, tuple[bytes, str]], kind: str
) -> None:
    data, content_type = outputs[kind]
    render_id = new_id()
    stored = await store.put(render_id, data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.get(render_id) == data
    assert b"".join(await chunks_of(store, render_id, 100, 1000)) == data[100:1100]
    if kind == "image":
        assert content_type == "image/png"
        assert Image.open(io.BytesIO(await store.get(render_id))).size == (IMAGE.width, IMAGE.height)
    else:
        assert content_type == "video/mp4"
        async with store.local_copy(render_id) as path:
            frame = await last_frame(path)  # ffmpeg seeks in the file
        assert Image.open(io.BytesIO(frame)).size == (VIDEO.width, VIDEO.height)


# What only the bucket has.


async def test_keys_fan_out_under_the_prefix_and_prefixes_keep_stores_apart(seaweedfs: SeaweedFS) -> None:
    settings = seaweedfs.store_settings(prefix="renders/a/")
    store, other = S3ArtifactStore(settings), S3ArtifactStore(replace(settings, prefix="renders/b/"))
    render_id = new_id()
    assert store.key(render_id) == f"renders/a/{render_id[:2]}/{render_id}"
    await store.put(render_id, b"in a")
    meta = await obstore.head_async(seaweedfs.raw_client(), store.key(render_id))
    assert meta["size"] == 4
    with pytest.raises(NotFound):
        await other.get(render_id)
    assert "secret" not in repr(store) and seaweedfs.secret_key not in repr(settings)


async def test_a_file_is_stored_a_piece_at_a_time_never_whole(store: Store, tmp_path: Path) -> None:
    render_id = new_id()
    path, digest = tmp_path / "video.mp4", hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(HUGE // MIN_PART_BYTES):
            piece = os.urandom(MIN_PART_BYTES)
            digest.update(piece)
            file.write(piece)
    del piece
    process = psutil.Process()
    before = peak = process.memory_info().rss
    upload = asyncio.ensure_future(store.put(render_id, path, "video/mp4"))
    while not upload.done():
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.002)
    stored = await upload
    # Read a MiB at a time as the upload takes it: on top, the client's buffers of the parts in flight
    # and of the next (19-26 MiB of 5 MiB parts, measured), a fraction of the file, whatever its size.
    assert peak - before < HUGE // 4, f"the upload grew memory by {(peak - before) >> 20} MiB"
    assert (stored.size, stored.sha256) == (HUGE, digest.hexdigest())
    read_back = hashlib.sha256()
    async for chunk in store.read(render_id):
        read_back.update(chunk)
    assert read_back.hexdigest() == digest.hexdigest() and path.exists()  # the caller's file, left


async def test_a_large_output_goes_up_in_parts_without_a_second_copy(
    seaweedfs: SeaweedFS, s3: S3ArtifactStore
) -> None:
    render_id = new_id()
    data = os.urandom(BIG)
    process = psutil.Process()
    before = peak = process.memory_info().rss
    upload = asyncio.ensure_future(s3.put(render_id, data))
    while not upload.done():
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(0.002)
    stored = await upload
    # The parts are views of the caller's bytes: at most the parts in flight on top, never a copy.
    assert peak - before < 3 * MIN_PART_BYTES, f"the upload grew memory by {(peak - before) >> 20} MiB"
    assert (stored.size, stored.sha256) == (BIG, hashlib.sha256(data).hexdigest())
    # S3's ETag of an object made of N parts ends in -N.
    meta = await obstore.head_async(seaweedfs.raw_client(), s3.key(render_id))
    assert meta["e_tag"] is not None and meta["e_tag"].strip('"').endswith(f"-{BIG // MIN_PART_BYTES}")
    boundary = MIN_PART_BYTES - 10
    assert b"".join(await chunks_of(s3, render_id, boundary, 20)) == data[boundary : boundary + 20]
    assert await s3.get(render_id) == data


async def test_a_store_that_is_down_is_unavailable_and_back_when_it_is(
    seaweedfs: SeaweedFS, s3: S3ArtifactStore
) -> None:
    render_id = new_id()
    await s3.put(render_id, b"kept")
    await s3.check()

    async def copy() -> None:
        async with s3.local_copy(render_id):
            pass

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "check": s3.check,
        "size": lambda: s3.size(render_id),
        "get": lambda: s3.get(render_id),
        "read": lambda: chunks_of(s3, render_id, 1, 2),
        "local copy": copy,
        "put": lambda: s3.put(new_id(), b"lost"),
        "put in parts": lambda: s3.put(new_id(), os.urandom(MIN_PART_BYTES + 1)),
        "delete": lambda: s3.delete(render_id),
    }
    await seaweedfs.down()
    try:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(Unavailable) as caught:
                await call()
            # A typed answer (503) after the retries of RENDERFLOW_ARTIFACT_S3_RETRY_S (0.3 s here),
            # not after a client's default minutes.
            assert caught.value.http_status == 503, name
            assert time.monotonic() - started < 3, name
        await s3.presigned_url(render_id)  # signing needs no store
    finally:
        await seaweedfs.up()
    assert await s3.get(render_id) == b"kept"
    await s3.close()


async def upload_under_way(seaweedfs: SeaweedFS, s3: S3ArtifactStore, render_id: str) -> asyncio.Future[Any]:
    """A BIG output's upload, returned once the server holds its first part (and it is not done)."""
    before = set(await seaweedfs.pending_uploads())
    upload = asyncio.ensure_future(s3.put(render_id, os.urandom(BIG)))
    async with asyncio.timeout(10):
        # The server announces no event: its list of uploads is looked at.
        while not set(await seaweedfs.pending_uploads()) - before and not upload.done():  # noqa: ASYNC110
            await asyncio.sleep(0.002)
    assert not upload.done(), "the upload ended before the test could interrupt it"
    return upload


async def test_an_upload_cut_by_a_crash_leaves_nothing_visible(
    seaweedfs: SeaweedFS, s3: S3ArtifactStore
) -> None:
    render_id = new_id()
    upload = await upload_under_way(seaweedfs, s3, render_id)
    try:
        await seaweedfs.down()
        with pytest.raises(Unavailable):
            await upload
    finally:
        if not seaweedfs.running:
            await seaweedfs.up()
    with pytest.raises(NotFound):
        await s3.size(render_id)
    with pytest.raises(FileNotFoundError):
        await obstore.head_async(seaweedfs.raw_client(), s3.key(render_id))


async def test_a_cancelled_upload_is_aborted(seaweedfs: SeaweedFS, s3: S3ArtifactStore) -> None:
    render_id = new_id()
    before = set(await seaweedfs.pending_uploads())
    upload = await upload_under_way(seaweedfs, s3, render_id)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    # Aborted, not left behind: its parts are gone, and no object appeared.
    assert set(await seaweedfs.pending_uploads()) == before
    with pytest.raises(NotFound):
        await s3.size(render_id)


async def test_a_presigned_url_serves_the_output_to_a_plain_client_until_it_expires(
    s3: S3ArtifactStore, outputs: dict[str, tuple[bytes, str]]
) -> None:
    data, content_type = outputs["image"]
    render_id = new_id()
    await s3.put(render_id, data, content_type=content_type)
    url, expires_at = await s3.presigned_url(render_id, 60)
    assert timedelta(seconds=58) < expires_at - datetime.now(UTC) <= timedelta(seconds=60)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/png"
            assert await response.read() == data
        async with session.get(url, headers={"Range": "bytes=0-7"}) as response:
            assert response.status == 206 and await response.read() == data[:8]
        # Signed for that object alone, and only as it was signed.
        other, _ = await s3.presigned_url(new_id(), 60)
        async with session.get(other) as response:
            assert response.status == 404
        async with session.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=61")) as response:
            assert response.status == 403
        async with session.get(url.split("?", 1)[0]) as response:
            assert response.status == 403
        short, _ = await s3.presigned_url(render_id, 1)
        await asyncio.sleep(2.1)
        async with session.get(short) as response:
            assert response.status == 403
    with pytest.raises(ValidationFailed):
        await s3.presigned_url(render_id, 8 * 86400)


async def test_a_local_copy_is_a_file_while_it_is_needed(s3: S3ArtifactStore) -> None:
    render_id = new_id()
    data = os.urandom(3 * 1024 * 1024 + 5)
    await s3.put(render_id, data)
    async with s3.local_copy(render_id) as path:
        assert path.read_bytes() == data
    assert not path.exists() and not path.parent.exists()
    with pytest.raises(NotFound):
        async with s3.local_copy(new_id()):
            pass


async def test_wrong_credentials_or_bucket_are_unavailable(seaweedfs: SeaweedFS) -> None:
    wrong_secret = S3ArtifactStore(seaweedfs.store_settings(secret_access_key="not-the-secret"))
    no_bucket = S3ArtifactStore(seaweedfs.store_settings(bucket="no-such-bucket"))
    for store in (wrong_secret, no_bucket):
        with pytest.raises(Unavailable):
            await store.check()
        with pytest.raises(Unavailable):
            await store.put(new_id(), b"x")
    with pytest.raises(Unavailable) as caught:
        await wrong_secret.get(new_id())
    assert "not-the-secret" not in str(caught.value)


# Settings.


def _env(**values: str) -> Env:
    return Env(values)


def test_settings_are_none_without_a_bucket_and_refused_half_given() -> None:
    assert ObjectStoreSettings.from_env(_env()) is None
    with pytest.raises(ConfigError, match="RENDERFLOW_ARTIFACT_S3_BUCKET must be set"):
        ObjectStoreSettings.from_env(_env(RENDERFLOW_ARTIFACT_S3_ENDPOINT="http://s3:8333"))


def test_settings_from_the_environment() -> None:
    settings = ObjectStoreSettings.from_env(
        _env(
            RENDERFLOW_ARTIFACT_S3_BUCKET="renders",
            RENDERFLOW_ARTIFACT_S3_ENDPOINT="http://seaweedfs:8333/",
            RENDERFLOW_ARTIFACT_S3_PREFIX="/prod/outputs",
            RENDERFLOW_ARTIFACT_S3_PART_BYTES=str(16 * 1024 * 1024),
            AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
            AWS_SECRET_ACCESS_KEY="very-secret-value",
            AWS_REGION="eu-west-3",
        )
    )
    assert settings is not None
    assert (settings.bucket, settings.endpoint, settings.prefix) == (
        "renders",
        "http://seaweedfs:8333",
        "prod/outputs/",
    )
    assert settings.path_style and settings.region == "eu-west-3" and settings.part_bytes == 16 * 1024 * 1024
    assert "very-secret-value" not in repr(settings) and "AKIAEXAMPLE" not in repr(settings)
    aws = ObjectStoreSettings.from_env(_env(RENDERFLOW_ARTIFACT_S3_BUCKET="renders"))
    assert aws is not None and not aws.path_style and aws.endpoint == "" and aws.region == "us-east-1"
    assert aws.access_key_id is None  # the AWS chain finds them


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"RENDERFLOW_ARTIFACT_S3_BUCKET": "Not_A_Bucket"}, "RENDERFLOW_ARTIFACT_S3_BUCKET"),
        ({"RENDERFLOW_ARTIFACT_S3_ENDPOINT": "seaweedfs:8333"}, "RENDERFLOW_ARTIFACT_S3_ENDPOINT"),
        ({"RENDERFLOW_ARTIFACT_S3_PART_BYTES": "1048576"}, "RENDERFLOW_ARTIFACT_S3_PART_BYTES"),
        ({"RENDERFLOW_ARTIFACT_S3_PRESIGN_S": "9999999"}, "RENDERFLOW_ARTIFACT_S3_PRESIGN_S"),
        ({"RENDERFLOW_ARTIFACT_S3_PREFIX": "a//b"}, "RENDERFLOW_ARTIFACT_S3_PREFIX"),
        ({"RENDERFLOW_ARTIFACT_S3_PREFIX": "a/../b"}, "RENDERFLOW_ARTIFACT_S3_PREFIX"),
        ({"RENDERFLOW_ARTIFACT_S3_PATH_STYLE": "maybe"}, "RENDERFLOW_ARTIFACT_S3_PATH_STYLE"),
        ({"AWS_SECRET_ACCESS_KEY": "very-secret-value"}, "AWS_ACCESS_KEY_ID"),
    ],
)
def test_bad_settings_name_the_variable(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        ObjectStoreSettings.from_env(_env(**{"RENDERFLOW_ARTIFACT_S3_BUCKET": "renders", **values}))
    assert "very-secret-value" not in str(caught.value)


# The whole stack on the object store.


async def test_the_stack_stores_and_serves_outputs_from_the_bucket(
    seaweedfs: SeaweedFS, database_url: str, tmp_path: Path
) -> None:
    bucket = seaweedfs.store_settings()
    async with running_on_bucket(database_url, tmp_path, bucket, "s3-worker") as stack:
        alice = await stack.user("alice")
        await stack.call("POST", "/v1/projects", alice, json={"slug": "art", "name": "Art"})
        request = {
            "project": "art",
            "kind": "image",
            "prompt": "a fox",
            "params": {"width": 96, "height": 64},
        }
        _, render = await stack.call("POST", "/v1/renders", {**alice, "Prefer": "wait=20"}, json=request)
        assert render["status"] == "succeeded", render
        url = f"{stack.base}/v1/renders/{render['id']}/output"
        async with stack.http.get(url, headers=alice) as response:
            served = await response.read()
        async with stack.http.get(url, headers={**alice, "Range": "bytes=0-7"}) as ranged:
            head = await ranged.read()

    stored = await S3ArtifactStore(bucket).get(render["id"])
    assert response.status == 200 and served == stored and stored.startswith(b"\x89PNG")
    assert len(served) == render["output"]["bytes"] and not list((tmp_path / "artifacts").rglob("*"))
    assert ranged.status == 206 and head == stored[:8]
