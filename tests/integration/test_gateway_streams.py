"""Event streams held open by a hostile or careless tenant: at most so many per API key (429
beyond), a revoked key's streams end within a second, an API key offered as a WebSocket
subprotocol in any case works and is never logged, and keys in query strings never reach a trace."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.metadata import admin
from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import REQUEST, quick_gateway_settings
from tests.support.gateway_stack import LiveStack, assert_problem, eventually, running_stack

MAX_STREAMS = 3


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def stack(database_url: str, tmp_path: Path, spans: InMemorySpanExporter) -> AsyncIterator[LiveStack]:
    # No worker: renders stay queued, so their streams stay open until the test ends them.
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = replace(quick_gateway_settings(), max_streams_per_key=MAX_STREAMS)
    async with running_stack(database_url, tmp_path, settings, tracer_provider=provider) as live:
        yield live


async def _user_with_render(stack: LiveStack, name: str) -> tuple[dict[str, str], str]:
    headers = await stack.user(name)
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    render = await stack.created("POST", "/v1/renders", headers, json=REQUEST)
    return headers, str(render["id"])


def _key(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def _open_sse(stack: LiveStack, headers: dict[str, str], render_id: str) -> aiohttp.ClientResponse:
    response = await stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers)
    assert response.status == 200
    await asyncio.wait_for(read_events(response, stop_after=1), 5)  # the `queued` event
    return response


def _ws_url(stack: LiveStack, render_id: str) -> str:
    return f"{stack.base.replace('http', 'ws')}/v1/renders/{render_id}/ws"


async def test_a_key_s_open_streams_are_capped(stack: LiveStack) -> None:
    alice, render_id = await _user_with_render(stack, "alice")
    async with AsyncExitStack() as open_streams:
        for _ in range(MAX_STREAMS - 1):
            open_streams.callback((await _open_sse(stack, alice, render_id)).close)
        socket = await stack.http.ws_connect(_ws_url(stack, render_id), headers=alice)
        await socket.receive_json(timeout=5)
        # SSE and WebSocket count alike: the next of either is refused.
        response, body = await stack.call("GET", f"/v1/renders/{render_id}/events", alice)
        assert_problem(response, body, 429, "quota_exceeded")
        assert "Retry-After" in response.headers
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await stack.http.ws_connect(_ws_url(stack, render_id), headers=alice)
        assert refused.value.status == 429
        # Another tenant is not affected.
        bob, bob_render = await _user_with_render(stack, "bob")
        open_streams.callback((await _open_sse(stack, bob, bob_render)).close)
        # A stream that ends gives its place back.
        await socket.close()

        async def freed() -> bool:
            url = f"{stack.base}/v1/renders/{render_id}/events"
            async with stack.http.get(url, headers=alice) as response:
                return response.status == 200

        await eventually(freed)


async def test_revoking_a_key_ends_its_open_streams_within_a_second(stack: LiveStack) -> None:
    alice, render_id = await _user_with_render(stack, "alice")
    bob, bob_render = await _user_with_render(stack, "bob")
    sse = await _open_sse(stack, alice, render_id)
    socket = await stack.http.ws_connect(_ws_url(stack, render_id), protocols=("bearer", _key(alice)))
    await socket.receive_json(timeout=5)
    bystander = await _open_sse(stack, bob, bob_render)

    [key] = await admin.list_keys(stack.database_url, "alice")
    revoked_at = time.monotonic()
    await admin.revoke_key(stack.database_url, str(key["id"]))

    async def sse_ended() -> None:
        # The stream ends (cut short: its render has not finished) instead of staying open.
        with pytest.raises(aiohttp.ClientPayloadError):
            await sse.content.read()

    await asyncio.wait_for(sse_ended(), 1.0)
    message = await socket.receive(timeout=1.0)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (aiohttp.WSCloseCode.POLICY_VIOLATION, "revoked")
    assert time.monotonic() - revoked_at < 1.0
    # The key no longer opens any; another key's stream goes on.
    response, body = await stack.call("GET", f"/v1/renders/{render_id}/events", alice)
    assert_problem(response, body, 401, "unauthenticated")
    assert not bystander.content.at_eof()
    bystander.close()
    sse.close()
    await socket.close()


async def test_a_key_offered_as_a_websocket_subprotocol_is_never_logged(
    stack: LiveStack, caplog: pytest.LogCaptureFixture
) -> None:
    alice, render_id = await _user_with_render(stack, "alice")
    key = _key(alice)
    caplog.set_level(logging.DEBUG)
    # Auth accepts the scheme in any case, and the handshake selects it as the client spelt it.
    for spelling in ("Bearer", "BEARER", "bearer"):
        async with stack.http.ws_connect(_ws_url(stack, render_id), protocols=(spelling, key)) as socket:
            assert socket.protocol == spelling
            assert (await socket.receive_json(timeout=5))["type"] == "queued"
    # A key offered some other way is no way in, and is not echoed either.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await stack.http.ws_connect(_ws_url(stack, render_id), protocols=("token", key))
    assert refused.value.status == 401
    async with stack.http.ws_connect(
        _ws_url(stack, render_id), headers=alice, protocols=("x", key)
    ) as socket:
        assert socket.protocol is None
    assert caplog.records and not [r for r in caplog.records if key in str(r.__dict__)]


async def test_query_strings_reach_traces_only_through_the_allow_list(
    stack: LiveStack, spans: InMemorySpanExporter
) -> None:
    alice, _ = await _user_with_render(stack, "alice")
    key = _key(alice)
    response, _ = await stack.call("GET", f"/v1/renders?project=art&api_key={key}&token={key}", alice)
    assert response.status == 422  # parameters the API does not know
    [span] = [s for s in spans.get_finished_spans() if s.name == "GET /v1/renders"]
    recorded = str(dict(span.attributes or {}))
    assert key not in recorded
    assert "project=art" in recorded and "api_key=REDACTED" in recorded


async def test_a_client_leaving_a_held_submit_is_no_fault_of_the_servers(
    stack: LiveStack, spans: InMemorySpanExporter
) -> None:
    alice, _ = await _user_with_render(stack, "alice")
    held = {**alice, "Prefer": "wait=30"}  # no worker: the render stays queued and the answer held
    with pytest.raises(TimeoutError):
        await stack.call("POST", "/v1/renders", held, json=REQUEST, timeout=aiohttp.ClientTimeout(total=0.5))

    def left() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.name == "POST /v1/renders" and (s.attributes or {}).get("http.response.status_code") == 499
        ]

    async def ended() -> bool:
        return bool(left())

    await eventually(ended)
    assert [s.status.status_code for s in left()] == [StatusCode.UNSET]
