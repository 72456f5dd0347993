"""Outputs served from an object store (presigned links and redirects, followed by plain clients),
uploads used as references (per user, size-capped, decoded, expiring), and retention deleting
objects: the whole stack (gateway, metadata, generation, a worker) on a real SeaweedFS bucket, and
on the local directory where the two differ."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import obstore
import pytest
from PIL import Image

from services.generation.object_store import ObjectStoreSettings, S3ArtifactStore
from services.generation.uploads.settings import UploadSettings
from shared.errors import NotFound
from tests.support.gateway_stack import LiveStack, in_process_worker, running_stack
from tests.support.origin import png_bytes
from tests.support.seaweedfs import SeaweedFS, serving_seaweedfs

MAX_UPLOAD = 200_000
UPLOAD_TTL_S = 3.0
SWEEP_S = 0.2
IMAGE = {"kind": "image", "prompt": "a fox", "params": {"width": 96, "height": 64}}
PLAIN = aiohttp.ClientTimeout(total=10)


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with serving_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


class Stack:
    """The live stack, its bucket (None: the local directory), and a user with a project."""

    def __init__(
        self,
        live: LiveStack,
        server: SeaweedFS | None,
        bucket: ObjectStoreSettings | None,
        user: dict[str, str],
    ) -> None:
        self.live = live
        self.server = server
        self.bucket = bucket
        self.user = user

    async def render(self, **changes: Any) -> dict[str, Any]:
        """A render of the user's, waited for until it ended."""
        request = {"project": "art", **IMAGE, **changes}
        _, render = await self.live.call(
            "POST", "/v1/renders", {**self.user, "Prefer": "wait=20"}, json=request
        )
        assert render["status"] in ("succeeded", "failed"), render
        return dict(render)

    async def upload(self, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        response, body = await self.live.call(
            "POST", "/v1/uploads", {**self.user, **(headers or {"Content-Type": "image/png"})}, data=data
        )
        return response.status, body


@pytest.fixture(params=["s3", "local"])
async def stack(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    server = request.getfixturevalue("seaweedfs") if request.param == "s3" else None
    bucket = server.store_settings() if server else None
    generation = {
        "artifact_s3": bucket,
        "uploads": UploadSettings(max_bytes=MAX_UPLOAD, ttl_s=UPLOAD_TTL_S),
        "retention_sweep_s": SWEEP_S,
    }
    worker = in_process_worker("links-worker", artifact_s3=bucket)
    async with running_stack(
        database_url, tmp_path, start_worker=worker, generation_changes=generation
    ) as live:
        user = await live.user("alice")
        await live.call("POST", "/v1/projects", user, json={"slug": "art", "name": "Art"})
        yield Stack(live, server, bucket, user)


def s3_only(stack: Stack) -> ObjectStoreSettings:
    if stack.bucket is None:
        pytest.skip("the local directory gives no presigned links")
    return stack.bucket


async def eventually_gone(store: S3ArtifactStore, key: str, within_s: float = 10.0) -> None:
    """Waits (bounded) until the store no longer has `key`: the sweep deletes on its own schedule."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await store.size(key)
        except NotFound:
            return
        assert time.monotonic() < deadline, f"{key} is still stored"
        await asyncio.sleep(SWEEP_S / 2)


# Serving: links and redirects


async def test_a_render_gives_a_download_link_when_asked_that_a_plain_client_follows(stack: Stack) -> None:
    bucket = s3_only(stack)
    render = await stack.render()
    path = f"/v1/renders/{render['id']}"
    _, plain = await stack.live.call("GET", path, stack.user)
    _, linked = await stack.live.call("GET", f"{path}?download_url=true", stack.user)
    _, page = await stack.live.call("GET", "/v1/renders?download_url=true", stack.user)

    assert plain["output"]["download_url"] is None and plain["output"]["download_expires_at"] is None
    link = linked["output"]["download_url"]
    expires = datetime.fromisoformat(linked["output"]["download_expires_at"])
    assert link.startswith(bucket.endpoint) and expires > datetime.now(UTC)
    assert [r["output"]["download_url"] is not None for r in page["renders"]] == [True]
    async with aiohttp.ClientSession(timeout=PLAIN) as plain_client, plain_client.get(link) as response:
        served = await response.read()
    assert response.status == 200 and served == await S3ArtifactStore(bucket).get(render["id"])
    assert response.headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("allow", [{"query": "?redirect=true"}, {"header": "redirect"}])
async def test_a_client_that_allows_it_is_redirected_to_the_store(
    stack: Stack, allow: dict[str, str]
) -> None:
    render = await stack.render()
    url = f"{stack.live.base}/v1/renders/{render['id']}/output{allow.get('query', '')}"
    headers = {**stack.user, "Prefer": allow["header"]} if "header" in allow else stack.user
    async with stack.live.http.get(url, headers=headers, allow_redirects=False) as response:
        await response.read()
    async with stack.live.http.get(url, headers={**headers, "Range": "bytes=0-7"}) as ranged:
        head = await ranged.read()

    if stack.bucket is None:  # the local directory: streamed, whatever the client allows
        assert response.status == 200 and "Location" not in response.headers
    else:
        assert response.status == 307 and response.headers["Location"].startswith(stack.bucket.endpoint)
        assert response.headers["Cache-Control"] == "private, no-store"
        assert response.headers.get("Preference-Applied") == allow.get("header")
    assert ranged.status == 206 and head == b"\x89PNG\r\n\x1a\n"  # the redirect followed keeps the Range


async def test_unless_the_client_allows_it_or_for_head_the_output_is_streamed(stack: Stack) -> None:
    s3_only(stack)
    render = await stack.render()
    url = f"{stack.live.base}/v1/renders/{render['id']}/output"
    async with stack.live.http.get(url, headers=stack.user, allow_redirects=False) as streamed:
        body = await streamed.read()
    async with stack.live.http.head(
        f"{url}?redirect=true", headers=stack.user, allow_redirects=False
    ) as head:
        pass
    assert streamed.status == 200 and len(body) == render["output"]["bytes"]
    assert head.status == 200 and head.headers["Content-Length"] == str(render["output"]["bytes"])


async def test_a_render_of_another_user_gives_no_link(stack: Stack) -> None:
    render = await stack.render()
    bob = await stack.live.user("bob")
    response, problem = await stack.live.call("GET", f"/v1/renders/{render['id']}?download_url=true", bob)
    redirected, _ = await stack.live.call(
        "GET", f"/v1/renders/{render['id']}/output?redirect=true", bob, allow_redirects=False
    )
    assert response.status == 404 and "download_url" not in str(problem)
    assert redirected.status == 404


async def test_a_bad_flag_is_a_field_error(stack: Stack) -> None:
    response, problem = await stack.live.call("GET", "/v1/renders?download_url=perhaps", stack.user)
    assert response.status == 422
    assert problem["errors"] == [{"field": "download_url", "message": "must be true or false"}]


# Uploads


async def test_an_upload_serves_as_a_render_reference(stack: Stack) -> None:
    image = png_bytes(40, 30)
    status, upload = await stack.upload(image, {"Content-Type": "application/octet-stream"})
    assert status == 201, upload
    assert (upload["content_type"], upload["width"], upload["height"], upload["bytes"]) == (
        "image/png",
        40,
        30,
        len(image),
    )
    _, again = await stack.live.call("GET", f"/v1/uploads/{upload['id']}", stack.user)
    render = await stack.render(reference={"upload_id": upload["id"], "required": True})

    assert again == upload
    assert render["status"] == "succeeded", render
    assert render["reference"]["upload_id"] == upload["id"] and render["reference"]["used"] is True
    if stack.bucket is not None:  # beside the outputs, under the store's prefix
        store = S3ArtifactStore(stack.bucket).scoped("uploads")
        assert await store.get(upload["id"]) == image


async def test_a_form_upload_takes_its_file_field_and_the_type_the_bytes_have(stack: Stack) -> None:
    out = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(out, format="JPEG")
    form = aiohttp.FormData()
    form.add_field("note", "ignored")
    form.add_field("file", out.getvalue(), filename="photo.png", content_type="image/png")
    response, upload = await stack.live.call("POST", "/v1/uploads", stack.user, data=form)
    assert response.status == 201 and response.headers["Location"] == f"/v1/uploads/{upload['id']}"
    assert (upload["content_type"], upload["width"], upload["height"]) == ("image/jpeg", 20, 10)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"<html>not an image</html>", 422, "file"),
        (png_bytes(8, 6)[:40], 422, "file"),
        (b"", 422, "file"),
        (png_bytes(400, 400, noise=True), 413, None),
    ],
    ids=["html", "truncated", "empty", "over-the-cap"],
)
async def test_what_is_not_an_image_or_too_large_is_refused_and_nothing_is_kept(
    stack: Stack, body: bytes, status: int, field: str | None
) -> None:
    assert len(body) < MAX_UPLOAD or status == 413
    refused, problem = await stack.upload(body)
    assert refused == status, problem
    assert problem["type"].endswith("payload_too_large" if status == 413 else "validation_failed")
    if field:
        assert [e["field"] for e in problem["errors"]] == [field]
    if stack.server is not None and stack.bucket is not None:
        kept = await obstore.list(stack.server.raw_client(), prefix=stack.bucket.prefix).collect_async()
        assert kept == []


@pytest.mark.parametrize(
    "body",
    [
        b"--b\r\nNone--b--\r\n",
        b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\nPNG...",
        b"no boundary at all",
    ],
    ids=["bad-header", "cut-short", "no-parts"],
)
async def test_a_malformed_form_is_refused_as_such(stack: Stack, body: bytes) -> None:
    status, problem = await stack.upload(body, {"Content-Type": "multipart/form-data; boundary=b"})
    assert status in (400, 422), problem
    assert problem["code"] in ("bad_request", "validation_failed")


async def test_a_form_without_its_file_field_is_refused(stack: Stack) -> None:
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(), filename="a.png", content_type="image/png")
    response, problem = await stack.live.call("POST", "/v1/uploads", stack.user, data=form)
    assert response.status == 422 and [e["field"] for e in problem["errors"]] == ["file"]


async def test_uploads_belong_to_their_user(stack: Stack) -> None:
    _, upload = await stack.upload(png_bytes())
    bob = await stack.live.user("bob")
    await stack.live.call("POST", "/v1/projects", bob, json={"slug": "art", "name": "Art"})
    seen, _ = await stack.live.call("GET", f"/v1/uploads/{upload['id']}", bob)
    deleted, _ = await stack.live.call("DELETE", f"/v1/uploads/{upload['id']}", bob)
    request = {"project": "art", **IMAGE, "reference": {"upload_id": upload["id"]}}
    submitted, problem = await stack.live.call("POST", "/v1/renders", bob, json=request)
    _, still = await stack.live.call("GET", f"/v1/uploads/{upload['id']}", stack.user)
    _, renders = await stack.live.call("GET", "/v1/renders", bob)

    assert (seen.status, deleted.status) == (404, 404)
    assert submitted.status == 422 and problem["errors"] == [
        {"field": "reference.upload_id", "message": "no such upload (or it expired)"}
    ]
    assert still == upload and renders["renders"] == []


async def test_a_batch_names_each_item_with_an_unknown_upload(stack: Stack) -> None:
    _, upload = await stack.upload(png_bytes())
    items = [
        {"project": "art", **IMAGE, "reference": {"upload_id": upload["id"]}},
        {"project": "art", **IMAGE, "reference": {"upload_id": "no-such-upload"}},
    ]
    response, problem = await stack.live.call("POST", "/v1/renders:batch", stack.user, json={"items": items})
    assert response.status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["items[1].reference.upload_id"]


async def test_a_deleted_upload_is_gone_with_its_bytes(stack: Stack) -> None:
    _, upload = await stack.upload(png_bytes())
    deleted, body = await stack.live.call("DELETE", f"/v1/uploads/{upload['id']}", stack.user)
    gone, _ = await stack.live.call("GET", f"/v1/uploads/{upload['id']}", stack.user)
    assert deleted.status == 200 and body == upload and gone.status == 404
    if stack.bucket is not None:
        await eventually_gone(S3ArtifactStore(stack.bucket).scoped("uploads"), upload["id"], within_s=0.0)


async def test_an_upload_expires_with_its_bytes(stack: Stack) -> None:
    _, upload = await stack.upload(png_bytes())
    expires = datetime.fromisoformat(upload["expires_at"])
    created = datetime.fromisoformat(upload["created_at"])
    assert abs((expires - created).total_seconds() - UPLOAD_TTL_S) < 0.5
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()))
    gone, _ = await stack.live.call("GET", f"/v1/uploads/{upload['id']}", stack.user)
    assert gone.status == 404
    if stack.bucket is not None:
        await eventually_gone(S3ArtifactStore(stack.bucket).scoped("uploads"), upload["id"])


# Retention


async def test_retention_deletes_the_output_from_the_store(stack: Stack) -> None:
    render = await stack.render(retention_s=1)
    assert render["status"] == "succeeded", render
    if stack.bucket is not None:
        await eventually_gone(S3ArtifactStore(stack.bucket), render["id"])
    deadline = time.monotonic() + 10
    while True:
        response, problem = await stack.live.call("GET", f"/v1/renders/{render['id']}/output", stack.user)
        if response.status == 410 or time.monotonic() > deadline:
            break
        await asyncio.sleep(SWEEP_S / 2)
    assert response.status == 410, problem
