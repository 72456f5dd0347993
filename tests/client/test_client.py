"""The Python client against the real stack: every call a user makes, both faces (asyncio and
blocking), typed errors from problem documents, and what the client promises under faults: an
event stream cut mid-render resumes with no gap and no repeat, a silent stream is reopened, a
429 storm and lost answers make no duplicate renders, and a wait with a timeout always ends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.typedefs import Handler
from PIL import Image
from renderflow_client import (
    AsyncRenderflow,
    NotFoundError,
    RateLimitedError,
    Render,
    RenderFailed,
    Renderflow,
    ValidationError,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)
from standardwebhooks.webhooks import Webhook

from gateway.config import Settings as GatewaySettings
from tests.client.conftest import STEP_MS, Account, new_account
from tests.support import serving_app
from tests.support.gateway_stack import procedural_worker, running_stack
from tests.support.origin import png_bytes
from tests.support.tcp_proxy import TcpProxy

IMAGE = {"width": 64, "height": 64, "steps": 20}


@pytest.fixture
async def client(account: Account) -> AsyncIterator[AsyncRenderflow]:
    async with AsyncRenderflow(account.url, account.api_key, project=account.project) as rf:
        yield rf


async def test_render_waits_and_downloads_a_valid_png(client: AsyncRenderflow, tmp_path: Path) -> None:
    render = await client.render("a lighthouse at dusk", params=IMAGE, timeout=30)
    saved = await client.download(render, tmp_path)
    in_memory = await client.download(render.id)

    assert render.succeeded and render.output is not None and render.progress == 1.0
    assert saved == tmp_path / f"{render.id}.png"
    assert isinstance(in_memory, bytes) and Path(saved).read_bytes() == in_memory
    assert hashlib.sha256(in_memory).hexdigest() == render.output.sha256
    with Image.open(io.BytesIO(in_memory)) as image:
        assert image.size == (64, 64)
    assert not list(tmp_path.glob(".*.part"))


async def test_events_arrive_in_order_and_end_with_the_render(client: AsyncRenderflow) -> None:
    render = await client.submit("a fox", params=IMAGE)
    events = [event async for event in client.events(render.id)]

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "queued" and events[-1].type == "succeeded"
    assert [e.progress for e in events if e.type == "progress"] == sorted(
        e.progress for e in events if e.type == "progress" and e.progress is not None
    )
    later = [event async for event in client.events(render.id, after=events[-3].seq)]
    assert later == events[-2:]


async def test_the_blocking_face_does_what_the_async_one_does(account: Account, tmp_path: Path) -> None:
    video_params = {"width": 64, "height": 64, "steps": 4, "duration_s": 1, "fps": 8}

    def use() -> tuple[Render, bytes | Path, list[str], list[str]]:
        with Renderflow(account.url, account.api_key, project=account.project) as rf:
            video = rf.render("waves", kind="video", params=video_params)
            path = rf.download(video, tmp_path / "waves.mp4")
            listed = [r.id for r in rf.list(page_size=1)]
            events = [e.type for e in rf.events(video.id)]
            return video, path, listed, events

    video, path, listed, events = await asyncio.to_thread(use)
    assert video.succeeded and video.output is not None and video.output.content_type == "video/mp4"
    assert isinstance(path, Path) and path.read_bytes()[4:8] == b"ftyp"
    assert listed == [video.id]  # one page of one, then no more
    assert events[0] == "queued" and events[-1] == "succeeded"


async def test_list_walks_every_page_with_filters(client: AsyncRenderflow) -> None:
    made = [await client.submit(f"frame {n}", params=IMAGE) for n in range(5)]
    for render in made:
        await client.wait(render.id, timeout=30)
    walked = [r.id async for r in client.list(page_size=2)]
    succeeded = [r.id async for r in client.list(status="succeeded", page_size=2, limit=3)]

    assert walked == [r.id for r in reversed(made)]
    assert len(succeeded) == 3 and set(succeeded) <= set(walked)


async def test_cancel_and_retry(client: AsyncRenderflow, account: Account) -> None:
    render = await client.submit("slow", params={**IMAGE, "steps": 150})
    cancelled = await client.wait((await client.cancel(render.id)).id, timeout=30)
    retried = await client.retry(render.id)
    again = await client.cancel(render.id)  # already cancelled: answered as it is

    assert cancelled.status == "cancelled" and cancelled.error is not None
    assert retried.id != render.id and retried.raw["retry_of"] == render.id
    assert again.status == "cancelled"
    await client.cancel(retried.id)


async def test_a_batch_is_queued_whole_and_followed_on_one_stream(client: AsyncRenderflow) -> None:
    items = [await client.render_request(f"tile {n}", params=IMAGE) for n in range(3)]
    batch = await client.batch(items)
    ended = {e.render_id async for e in client.batch_events(batch.id) if e.terminal}
    final = await client.get_batch(batch.id)

    assert len(batch.renders) == 3 and ended == {r.id for r in batch.renders}
    assert final.counts["succeeded"] == 3
    with pytest.raises(ValidationError) as invalid:
        await client.batch([*items, await client.render_request("")])
    assert [e.field for e in invalid.value.errors] == ["items[3].prompt"]


async def test_an_upload_serves_as_the_reference_of_a_render(client: AsyncRenderflow, tmp_path: Path) -> None:
    sketch = tmp_path / "sketch.png"
    sketch.write_bytes(png_bytes(32, 24))
    render = await client.render("the sketch, in oils", params=IMAGE, reference=sketch, timeout=30)
    upload_id = render.raw["reference"]["upload_id"]

    assert render.raw["reference"]["used"] is True
    assert (await client.get_upload(upload_id)).width == 32


async def test_projects_chains_and_rules(client: AsyncRenderflow) -> None:
    project = await client.ensure_project("art", "Art")
    again = await client.ensure_project("art")
    chain = await client.create_chain("art", "storyboard")
    rule = await client.create_rule("art", "warm light", chain_id=chain.id)
    changed = await client.update_rule("art", rule.id, active=False)
    rules = [r async for r in client.list_rules("art")]
    await client.delete_rule("art", rule.id)

    assert again == project and chain.name == "storyboard" and rule.chain_id == chain.id
    assert not changed.active and [r.id for r in rules] == [rule.id]
    assert [r async for r in client.list_rules("art")] == []
    assert "art" in [p.slug async for p in client.list_projects()]
    assert [c.name async for c in client.list_chains("art")] == ["default", "storyboard"]


async def test_errors_are_typed_from_the_problem_document(client: AsyncRenderflow) -> None:
    with pytest.raises(ValidationError) as invalid:
        await client.submit("x", params={"width": 99999})
    with pytest.raises(NotFoundError) as missing:
        await client.get("no-such-render")
    with pytest.raises(RenderFailed) as failed:
        await client.render(
            "x", params=IMAGE, reference={"url": "http://127.0.0.1:9/none.png", "required": True}
        )

    error = invalid.value
    assert (error.status, error.code, error.retryable) == (422, "validation_failed", False)
    assert [e.field for e in error.errors] == ["params.width"] and error.request_id
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert failed.value.render.status == "failed" and failed.value.code == "reference_fetch_failed"
    assert failed.value.render.id in str(failed.value)


async def test_a_webhook_is_verified_and_a_forged_one_refused(client: AsyncRenderflow) -> None:
    secret = await client.webhook_secret()
    body = json.dumps({"type": "render.completed", "data": {"id": "r1"}}).encode()
    now = datetime.now(UTC).replace(microsecond=0)
    signature = Webhook(secret).sign("msg_1", now, body.decode())  # as a receiver's library makes it
    signed = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }

    assert verify_webhook(secret, body, signed)["type"] == "render.completed"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, body.replace(b"r1", b"r2"), signed)
    other = "whsec_" + base64.b64encode(b"k" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        verify_webhook(other, body, signed)


# Faults


async def test_a_stream_cut_mid_render_resumes_with_no_gap_and_no_repeat(account: Account) -> None:
    proxy = TcpProxy("127.0.0.1", int(account.url.rsplit(":", 1)[1]))
    await proxy.start()
    cuts = 0
    async with AsyncRenderflow(f"http://127.0.0.1:{proxy.port}", account.api_key, project="demo") as rf:
        render = await rf.submit("a long one", params={**IMAGE, "steps": 40})
        seen = []
        async for event in rf.events(render.id):
            seen.append(event)
            if event.type == "progress" and cuts < 2 and len(seen) % 4 == 0:
                cuts += 1
                await proxy.cut()  # the connection drops; the next ones are refused for a while
                asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(proxy.start()))
    await proxy.cut()
    assert cuts == 2
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].type == "succeeded"


async def test_a_silent_stream_is_reopened_without_losing_events(account: Account) -> None:
    async with AsyncRenderflow(account.url, account.api_key, project="demo") as rf:
        # Steps of STEP_MS: silences much longer than the heartbeat timeout asked for here.
        render = await rf.submit("patient", params={**IMAGE, "steps": 10})
        events = [e async for e in rf.events(render.id, heartbeat_timeout=STEP_MS / 1000 / 4)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and events[-1].terminal


async def test_a_wait_with_a_timeout_always_ends(client: AsyncRenderflow) -> None:
    render = await client.submit("very slow", params={**IMAGE, "steps": 150})
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        await client.wait(render.id, timeout=0.5)
    waited = time.monotonic() - started
    await client.cancel(render.id)

    assert 0.5 <= waited < 3.0
    assert timed_out.value.render.id == render.id and timed_out.value.render.status in ("queued", "running")


async def test_a_429_storm_makes_every_render_once(database_url: str, tmp_path: Path) -> None:
    limited = GatewaySettings(shutdown_grace_s=0.5, rate_limit_per_s=5.0, rate_limit_burst=5)
    async with running_stack(
        database_url, tmp_path, gateway=limited, start_worker=procedural_worker("storm")
    ) as stack:
        account = await new_account(stack)
        async with AsyncRenderflow(account.url, account.api_key, project="demo", max_retries=20) as rf:
            renders = await asyncio.gather(*(rf.submit(f"storm {n}", params=IMAGE) for n in range(20)))
            listed = [r.id async for r in rf.list()]
        async with AsyncRenderflow(account.url, account.api_key, project="demo", max_retries=0) as impatient:
            refused = await asyncio.gather(
                *(impatient.submit("one too many", params=IMAGE) for _ in range(10)), return_exceptions=True
            )
    assert len({r.id for r in renders}) == 20 and sorted(listed) == sorted(r.id for r in renders)
    limited_out = [e for e in refused if isinstance(e, RateLimitedError)]
    assert limited_out and all(e.retry_after and e.retry_after >= 1 for e in limited_out)


async def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_render(account: Account) -> None:
    flaky = FlakyNetwork(account.url, lose_submits=2)
    async with serving(flaky.forward) as url, AsyncRenderflow(url, account.api_key, project="demo") as rf:
        render = await rf.submit("only once", params=IMAGE)
        listed = [r.id async for r in rf.list()]
    assert flaky.lost == 2 and flaky.submits == 3
    assert listed == [render.id]


async def test_a_download_cut_midway_resumes_where_it_broke_off(account: Account, tmp_path: Path) -> None:
    flaky = FlakyNetwork(account.url, cut_downloads=1)
    async with serving(flaky.forward) as url, AsyncRenderflow(url, account.api_key, project="demo") as rf:
        render = await rf.render("noise", params={"width": 512, "height": 512, "steps": 2}, timeout=30)
        saved = await rf.download(render, tmp_path / "noise.png")
    assert render.output is not None and isinstance(saved, Path)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == render.output.sha256
    assert flaky.cut_at and flaky.ranges == [None, f"bytes={flaky.cut_at}-"]


class FlakyNetwork:
    """A proxy in front of the gateway that forwards every request, but drops the connection
    instead of answering the first `lose_submits` submits (the render was queued, the client never
    heard), and cuts the first `cut_downloads` downloads of an output halfway."""

    def __init__(self, upstream: str, *, lose_submits: int = 0, cut_downloads: int = 0) -> None:
        self._upstream = upstream
        self._lose, self._cut = lose_submits, cut_downloads
        self.submits = self.lost = self.cut_at = 0
        self.ranges: list[str | None] = []
        """The Range of each download of an output."""

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, self._upstream + request.path_qs, headers=headers, data=body
            ) as answer,
        ):
            payload = await answer.read()
        kept = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
        }
        assert request.transport is not None
        if request.method == "POST" and request.path == "/v1/renders":
            self.submits += 1
            if self.lost < self._lose:
                self.lost += 1
                request.transport.abort()
                return web.Response()
        if request.path.endswith("/output"):
            self.ranges.append(request.headers.get("Range"))
            if self._cut:
                self._cut -= 1
                self.cut_at = len(payload) // 2
                response = web.StreamResponse(status=answer.status, headers=kept)
                response.content_length = len(payload)
                await response.prepare(request)
                await response.write(payload[: self.cut_at])
                request.transport.abort()
                return response
        return web.Response(status=answer.status, body=payload, headers=kept)


def serving(handler: Handler) -> AbstractAsyncContextManager[str]:
    """`handler` answering every request on a port of its own; its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return serving_app(app)
