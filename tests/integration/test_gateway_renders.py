"""Renders through the gateway with a real worker: submit in milliseconds, events over SSE until the
end, the output as a PNG with ETag and ranges, cancellation, and streams ended at shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from PIL import Image

from gateway.app import running as gateway_running
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker


@pytest.fixture
def stack_worker(worker_step_ms: float) -> StartWorker:
    return procedural_worker("gateway-test", worker_step_ms)


@dataclass
class EventStream:
    """What an SSE response carried."""

    events: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    """A render stream's ids (its seqs)."""
    cursors: list[str] = field(default_factory=list)
    """A batch stream's ids."""
    heartbeats: int = 0


async def read_events(
    response: aiohttp.ClientResponse, stop_after: int | None = None, *, batch: bool = False
) -> EventStream:
    """Reads SSE frames until the server closes the stream (or `stop_after` events); every event
    has an id: its seq, or in a `batch` stream a cursor."""
    seen = EventStream()
    frame: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            seen.heartbeats += 1
        elif line:
            name, _, value = line.partition(": ")
            frame[name] = value
        elif "data" in frame:
            event = json.loads(frame["data"])
            assert frame["event"] == event["type"]
            if batch:
                seen.cursors.append(frame["id"])
            else:
                assert int(frame["id"]) == event["seq"]
                seen.ids.append(int(frame["id"]))
            seen.events.append(event)
            frame = {}
            if stop_after is not None and len(seen.events) >= stop_after:
                break
    return seen


async def submit(stack: LiveStack, headers: dict[str, str], **request: Any) -> dict[str, Any]:
    response, render = await stack.call("POST", "/v1/renders", headers, json={"kind": "image", **request})
    assert response.status == 202, render
    return dict(render)


async def test_a_render_from_submit_to_download(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    _, project = await stack.call("POST", "/v1/projects", alice, json={"slug": "art", "name": "Art"})
    _, rule = await stack.call("POST", "/v1/projects/art/rules", alice, json={"text": "in sepia"})
    request = {
        "project": "art",
        "kind": "image",
        "prompt": "a fox",
        "params": {"width": 96, "height": 64, "steps": 3},
    }
    idempotent = {**alice, "Idempotency-Key": "fox-1"}

    started = time.perf_counter()
    response, render = await stack.call("POST", "/v1/renders", idempotent, json=request)
    elapsed = time.perf_counter() - started
    assert response.status == 202, render
    assert elapsed < 0.5, f"submit took {elapsed:.3f} s"
    assert response.headers["Location"] == f"/v1/renders/{render['id']}"
    timing = response.headers["Server-Timing"]
    for phase in ("auth", "validation", "enqueue", "total"):
        assert f"{phase};dur=" in timing, timing
    assert render["status"] in {"queued", "running"} and render["position"] == 1
    assert render["chain_id"] == project["default_chain_id"]
    assert render["rules"] == [{"id": rule["id"], "text": "in sepia"}]
    assert render["params"]["width"] == 96 and isinstance(render["params"]["seed"], int)
    assert render["timings"]["auth_ms"] is not None and render["timings"]["db_ms"] is not None
    response, again = await stack.call("POST", "/v1/renders", idempotent, json=request)
    assert again["id"] == render["id"]  # the same key and body: the render already queued
    assert response.status == 202 and response.headers["Idempotent-Replayed"] == "true"
    response, body = await stack.call("POST", "/v1/renders", idempotent, json={**request, "prompt": "a wolf"})
    assert_problem(response, body, 422, "validation_failed")
    assert body["errors"][0]["field"] == "idempotency_key"

    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=alice) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        stream = await asyncio.wait_for(read_events(response), 20)
    types = [e["type"] for e in stream.events]
    assert types[0] == "queued" and types[-1] == "succeeded" and "started" in types
    assert stream.ids == sorted(set(stream.ids))
    assert all(e["render_id"] == render["id"] and e["at"].endswith("Z") for e in stream.events)

    _, done = await stack.call("GET", f"/v1/renders/{render['id']}", alice)
    assert done["status"] == "succeeded" and done["progress"] == 1
    assert done["output"]["content_type"] == "image/png" and (
        done["output"]["width"],
        done["output"]["height"],
    ) == (96, 64)

    url = f"/v1/renders/{render['id']}/output"
    async with stack.http.get(stack.base + url, headers=alice) as response:
        image = await response.read()
        assert response.status == 200 and response.content_type == "image/png"
        assert int(response.headers["Content-Length"]) == len(image) == done["output"]["bytes"]
        etag = response.headers["ETag"]
    assert Image.open(io.BytesIO(image)).size == (96, 64)
    response, _ = await stack.call("GET", url, {**alice, "If-None-Match": etag})
    assert response.status == 304 and response.headers["ETag"] == etag
    async with stack.http.get(stack.base + url, headers={**alice, "Range": "bytes=0-99"}) as response:
        assert response.status == 206 and await response.read() == image[:100]
        assert response.headers["Content-Range"] == f"bytes 0-99/{len(image)}"
    async with stack.http.get(stack.base + url, headers={**alice, "Range": "bytes=-10"}) as response:
        assert response.status == 206 and await response.read() == image[-10:]
    response, body = await stack.call("GET", url, {**alice, "Range": f"bytes={len(image)}-"})
    assert_problem(response, body, 416, "range_not_satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{len(image)}"

    response, body = await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
    assert_problem(response, body, 409, "conflict")

    # A finished render replays and closes; Last-Event-ID (or last_event_id) resumes after a seq.
    for headers, path in (
        ({**alice, "Last-Event-ID": str(stream.ids[1])}, ""),
        (alice, f"?last_event_id={stream.ids[1]}"),
    ):
        async with stack.http.get(
            f"{stack.base}/v1/renders/{render['id']}/events{path}", headers=headers
        ) as response:
            replay = await asyncio.wait_for(read_events(response), 5)
        assert replay.ids == stream.ids[2:]

    second = await submit(stack, alice, project="art", prompt="a second fox")
    _, chain = await stack.call(
        "GET", f"/v1/projects/art/chains/{project['default_chain_id']}/renders", alice
    )
    # The reused key with another body was refused before it took a position: no gap.
    assert [(r["id"], r["position"]) for r in chain["renders"]] == [(render["id"], 1), (second["id"], 2)]
    _, listed = await stack.call("GET", "/v1/renders?project=art&status=succeeded", alice)
    assert render["id"] in [r["id"] for r in listed["renders"]]
    assert all(r["status"] == "succeeded" for r in listed["renders"])


@pytest.mark.parametrize("worker_step_ms", [100.0])
async def test_a_render_keeps_the_workflow_it_names_and_a_malformed_name_is_refused(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    await stack.call("POST", "/v1/projects", alice, json={"slug": "flows", "name": "Flows"})

    render = await submit(stack, alice, project="flows", prompt="p", params={"workflow": "flux-dev"})
    response, plain = await stack.call("GET", f"/v1/renders/{render['id']}", alice)
    response, refused = await stack.call(
        "POST",
        "/v1/renders",
        alice,
        json={"project": "flows", "kind": "image", "prompt": "p", "params": {"workflow": "../etc/passwd"}},
    )

    assert render["params"]["workflow"] == "flux-dev" and plain["params"]["workflow"] == "flux-dev"
    assert_problem(response, refused, 422, "validation_failed")
    assert refused["errors"][0]["field"] == "params.workflow"


async def test_cancel_and_an_output_not_ready(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    await stack.call("POST", "/v1/projects", alice, json={"slug": "slow", "name": "Slow"})
    render = await submit(stack, alice, project="slow", prompt="p", params={"steps": 100})
    response, body = await stack.call("GET", f"/v1/renders/{render['id']}/output", alice)
    assert_problem(response, body, 409, "conflict")
    response, cancelled = await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
    assert response.status == 202 and cancelled["id"] == render["id"]
    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=alice) as response:
        stream = await asyncio.wait_for(read_events(response), 10)
    assert stream.events[-1]["type"] == "cancelled"
    response, body = await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
    assert response.status == 200 and body["status"] == "cancelled"  # again: nothing changes


@pytest.mark.parametrize("worker_step_ms", [400.0])
async def test_shutdown_ends_open_event_streams_at_once(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    await stack.call("POST", "/v1/projects", alice, json={"slug": "long", "name": "Long"})
    render = await submit(stack, alice, project="long", prompt="p", params={"steps": 100})
    gateway = AsyncExitStack()
    port = await gateway.enter_async_context(gateway_running(replace(stack.settings, shutdown_grace_s=30)))
    async with stack.http.get(
        f"http://127.0.0.1:{port}/v1/renders/{render['id']}/events", headers=alice
    ) as response:
        await asyncio.wait_for(read_events(response, stop_after=1), 5)
        started = time.perf_counter()
        await gateway.aclose()
        assert time.perf_counter() - started < 5  # not the 30 s grace: streams are ended, not awaited
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 5)
    await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
