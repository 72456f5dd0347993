"""Watching renders over HTTP against the real services and a worker: SSE resumes from any event
without gap or repeat, fifty watchers cost one upstream Watch, WebSockets carry the same events,
clients that leave leave nothing behind, and cancellation while queued and while running."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings as GatewaySettings
from gateway.sse import NEXT_ITEM_TASK
from gateway.watch_hub import PUMP_TASK_PREFIX
from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import PARAMS, REQUEST, quick_gateway_settings
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, eventually, procedural_worker

WATCHERS = 50


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return quick_gateway_settings()


@pytest.fixture
def stack_worker(worker_step_ms: float, worker_concurrency: int) -> StartWorker:
    return procedural_worker("watching-test", worker_step_ms, worker_concurrency)


async def _finished(stack: LiveStack, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    request = {**REQUEST, "params": {**PARAMS, **params}}
    response, render = await stack.call("POST", "/v1/renders", {**headers, "Prefer": "wait=2"}, json=request)
    assert response.status == 200 and render["status"] == "succeeded", render
    return dict(render)


async def _queued(stack: LiveStack, headers: dict[str, str], steps: int) -> dict[str, Any]:
    request = {**REQUEST, "params": {**PARAMS, "steps": steps}}
    response, render = await stack.call("POST", "/v1/renders", headers, json=request)
    assert response.status == 202, render
    return dict(render)


async def _user_with_project(stack: LiveStack) -> dict[str, str]:
    alice = await stack.user("alice")
    await stack.call("POST", "/v1/projects", alice, json={"slug": "art", "name": "Art"})
    return alice


def _live_tasks() -> int:
    return sum(not task.done() for task in asyncio.all_tasks())


def _gateway_leftovers(before: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since `before` that serve a watch and are still alive."""
    names = (PUMP_TASK_PREFIX, NEXT_ITEM_TASK, "ws-sender")
    return [
        t.get_name()
        for t in asyncio.all_tasks()
        if t not in before and not t.done() and t.get_name().startswith(names)
    ]


async def test_sse_resumes_from_every_point_of_a_finished_render(stack: LiveStack) -> None:
    alice = await _user_with_project(stack)
    render = await _finished(stack, alice, steps=6)
    url = f"{stack.base}/v1/renders/{render['id']}/events"
    async with stack.http.get(url, headers=alice) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        full = await asyncio.wait_for(read_events(response), 10)
    count = len(full.ids)
    assert full.ids == list(range(1, count + 1)) and count >= 4
    assert full.events[0]["type"] == "queued" and full.events[-1]["type"] == "succeeded"
    for last in range(count + 1):
        # EventSource sends the header; a client that cannot set headers uses the query.
        headers, query = (
            ({**alice, "Last-Event-ID": str(last)}, "") if last % 2 else (alice, f"?last_event_id={last}")
        )
        async with stack.http.get(url + query, headers=headers) as response:
            resumed = await asyncio.wait_for(read_events(response), 5)
        assert resumed.ids == full.ids[last:], last
        assert resumed.events == full.events[last:]
    response, body = await stack.call(
        "GET", f"/v1/renders/{render['id']}/events", {**alice, "Last-Event-ID": "x"}
    )
    assert_problem(response, body, 422, "validation_failed")
    bob = await stack.user("bob")
    response, body = await stack.call("GET", f"/v1/renders/{render['id']}/events", bob)
    assert_problem(response, body, 404, "not_found")


@pytest.mark.parametrize("worker_step_ms", [60.0])
async def test_fifty_watchers_of_a_render_cost_one_upstream_watch(stack: LiveStack) -> None:
    alice = await _user_with_project(stack)
    render = await _queued(stack, alice, steps=40)  # about 2.5 s of steps
    generation = stack.clients.generation
    watches_before = generation.streams_opened["Watch"]
    url = f"{stack.base}/v1/renders/{render['id']}/events"

    async def watch(last_event_id: int = 0) -> list[int]:
        headers = {**alice, "Last-Event-ID": str(last_event_id)} if last_event_id else alice
        async with stack.http.get(url, headers=headers) as response:
            assert response.status == 200
            seen = await asyncio.wait_for(read_events(response), 20)
        assert seen.events[-1]["type"] == "succeeded"
        return seen.ids

    async def upstream_open(count: int) -> bool:
        return generation.open_streams == count

    watchers = [asyncio.create_task(watch()) for _ in range(WATCHERS)]
    await eventually(lambda: upstream_open(1))
    late = await watch(last_event_id=2)  # joins while the others watch, resumes after seq 2
    streams = await asyncio.gather(*watchers)
    assert generation.streams_opened["Watch"] - watches_before == 1
    complete = list(range(1, streams[0][-1] + 1))
    assert all(ids == complete for ids in streams)
    assert late == complete[2:]
    await eventually(lambda: upstream_open(0))


@pytest.mark.parametrize("worker_step_ms", [400.0])  # silences longer than the 0.2 s heartbeat
async def test_clients_that_leave_mid_stream_leave_no_task_nor_upstream_call(stack: LiveStack) -> None:
    alice = await _user_with_project(stack)
    render = await _queued(stack, alice, steps=100)
    generation = stack.clients.generation

    async def running() -> bool:
        _, now = await stack.call("GET", f"/v1/renders/{render['id']}", alice)
        return bool(now["status"] == "running")

    await eventually(running)  # the worker's tasks for it exist from here on
    before = set(asyncio.all_tasks())
    live_before = _live_tasks()

    def settled() -> bool:
        # No upstream call, none of the watch's own tasks, and no more tasks alive than before (the
        # services' own come and go, so their number is what is compared).
        return not generation.open_streams and not _gateway_leftovers(before) and _live_tasks() <= live_before

    async def released() -> None:
        async with asyncio.timeout(5):  # not `eventually`: its wait_for would be one more task
            while not settled():  # noqa: ASYNC110 (only observable by asking)
                await asyncio.sleep(0.02)

    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=alice) as response:
        first = await asyncio.wait_for(read_events(response, stop_after=1), 5)
        assert first.events[0]["type"] == "queued" and generation.open_streams == 1
        beat = await asyncio.wait_for(response.content.readuntil(b":\n\n"), 5)  # a heartbeat comes
        assert beat.endswith(b":\n\n")
        response.close()  # the client goes away mid-stream
    await released()

    socket = await stack.http.ws_connect(
        f"{stack.base.replace('http', 'ws')}/v1/renders/{render['id']}/ws", headers=alice
    )
    message = await socket.receive_json(timeout=5)
    assert message["seq"] == 1 and generation.open_streams == 1
    await socket.close()
    await released()
    response, _ = await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
    assert response.status == 202


async def test_websocket_carries_the_same_events_and_resumes(stack: LiveStack) -> None:
    alice = await _user_with_project(stack)
    render = await _finished(stack, alice, steps=4)
    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=alice) as response:
        sse = await asyncio.wait_for(read_events(response), 10)
    ws_url = f"{stack.base.replace('http', 'ws')}/v1/renders/{render['id']}/ws"

    async def messages(socket: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
        received = []
        async for message in socket:
            assert message.type == aiohttp.WSMsgType.TEXT
            received.append(json.loads(message.data))
        assert socket.close_code == aiohttp.WSCloseCode.OK  # closed normally after the terminal event
        return received

    async with stack.http.ws_connect(ws_url, headers=alice) as socket:
        assert await asyncio.wait_for(messages(socket), 5) == sse.events
    async with stack.http.ws_connect(f"{ws_url}?last_event_id=2", headers=alice) as socket:
        assert await asyncio.wait_for(messages(socket), 5) == sse.events[2:]
    # Browsers cannot set Authorization on a WebSocket: the key rides as a subprotocol.
    key = alice["Authorization"].removeprefix("Bearer ")
    async with stack.http.ws_connect(ws_url, protocols=("bearer", key)) as socket:
        assert socket.protocol == "bearer"
        assert await asyncio.wait_for(messages(socket), 5) == sse.events
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await stack.http.ws_connect(ws_url)
    assert refused.value.status == 401
    response, body = await stack.call("GET", f"/v1/renders/{render['id']}/ws", alice)
    assert_problem(response, body, 400, "bad_request")  # not a WebSocket handshake


@pytest.mark.parametrize(("worker_step_ms", "worker_concurrency"), [(100.0, 1)])
async def test_cancel_while_queued_and_while_running(stack: LiveStack) -> None:
    alice = await _user_with_project(stack)
    running = await _queued(stack, alice, steps=100)
    queued = await _queued(stack, alice, steps=100)  # behind the first: the worker runs one at a time
    url = f"{stack.base}/v1/renders/{running['id']}/events"
    async with stack.http.get(url, headers=alice) as response:
        started = await asyncio.wait_for(read_events(response, stop_after=2), 10)
    assert [e["type"] for e in started.events] == ["queued", "started"]
    response, body = await stack.call("GET", f"/v1/renders/{queued['id']}", alice)
    assert body["status"] == "queued" and body["queue_position"] == 0

    response, cancelled = await stack.call("POST", f"/v1/renders/{queued['id']}:cancel", alice)
    assert response.status == 202 and cancelled["status"] == "cancelled"
    assert cancelled["error"]["code"] == "cancelled" and cancelled["error"]["retryable"] is False
    response, stopping = await stack.call("POST", f"/v1/renders/{running['id']}:cancel", alice)
    assert response.status == 202 and stopping["status"] in {"running", "cancelled"}
    async with stack.http.get(url, headers={**alice, "Last-Event-ID": "2"}) as response:
        rest = await asyncio.wait_for(read_events(response), 10)
    assert rest.events[-1]["type"] == "cancelled" and rest.ids[0] == 3
    for render in (queued, running):  # again: nothing changes
        response, body = await stack.call("POST", f"/v1/renders/{render['id']}:cancel", alice)
        assert response.status == 200 and body["status"] == "cancelled"
