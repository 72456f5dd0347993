"""Rate limits on the submit routes, over real HTTP: a token bucket per API key, RateLimit-* headers,
429 `rate_limited` with Retry-After, a batch costing one token per render, one bucket shared by
two gateways through a real Redis, submits let through when Redis is down; and the cap on a user's
active renders (enforced by generation) as 429 `quota_exceeded`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider

from gateway.app import running as gateway_running
from gateway.config import Settings as GatewaySettings
from services.generation.config import Settings as GenerationSettings
from services.generation.server import running as generation_running
from shared.settings import Addresses
from tests.conftest import free_port
from tests.support.gateway_stack import HTTP_TIMEOUT, LiveStack, assert_problem

BURST = 4
# Slow enough that no token comes back while a test runs.
RATE = 0.01


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return GatewaySettings(port=0, shutdown_grace_s=0.5, rate_limit_per_s=RATE, rate_limit_burst=BURST)


def render(project: str = "lim") -> dict[str, Any]:
    return {
        "project": project,
        "kind": "image",
        "prompt": "a lighthouse",
        "params": {"width": 64, "height": 64},
    }


async def _with_project(stack: LiveStack, name: str) -> dict[str, str]:
    headers = await stack.user(name)
    response, _ = await stack.call("POST", "/v1/projects", headers, json={"slug": "lim", "name": "Limits"})
    assert response.status == 201
    return headers


def _limits(response: aiohttp.ClientResponse) -> tuple[int, int, int]:
    headers = response.headers
    return (
        int(headers["RateLimit-Limit"]),
        int(headers["RateLimit-Remaining"]),
        int(headers["RateLimit-Reset"]),
    )


async def test_submits_draw_from_the_key_s_bucket_until_refused(stack: LiveStack) -> None:
    alice = await _with_project(stack, "alice")
    seen = []
    for _ in range(BURST):
        response, _ = await stack.call("POST", "/v1/renders", alice, json=render())
        assert response.status == 202
        seen.append(_limits(response))
    assert [remaining for _, remaining, _ in seen] == [3, 2, 1, 0]
    assert all(limit == BURST for limit, _, _ in seen)
    assert seen[-1][2] == round(BURST / RATE)  # seconds until full again

    response, body = await stack.call("POST", "/v1/renders", alice, json=render())
    assert_problem(response, body, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) == round(1 / RATE)
    assert _limits(response)[1] == 0
    # Every submit route shares the bucket, aliases too.
    chain = f"/v1/projects/lim/chains/{(await _default_chain(stack, alice))}/renders"
    for path, payload in [
        (chain, {"kind": "image", "prompt": "p"}),
        ("/render", render()),
        ("/v1/renders:batch", {"items": [render()]}),
    ]:
        response, body = await stack.call("POST", path, alice, json=payload)
        assert_problem(response, body, 429, "rate_limited")

    # Reads are not limited, and carry no RateLimit fields.
    response, _ = await stack.call("GET", "/v1/renders", alice)
    assert response.status == 200 and "RateLimit-Limit" not in response.headers
    # Another key has its own bucket.
    bob = await _with_project(stack, "bob")
    response, _ = await stack.call("POST", "/v1/renders", bob, json=render())
    assert response.status == 202 and _limits(response)[1] == BURST - 1


async def _default_chain(stack: LiveStack, headers: dict[str, str]) -> str:
    _, project = await stack.call("GET", "/v1/projects/lim", headers)
    return str(project["default_chain_id"])


async def test_a_batch_costs_a_token_per_render(stack: LiveStack) -> None:
    alice = await _with_project(stack, "alice")
    response, _ = await stack.call("POST", "/v1/renders:batch", alice, json={"items": [render()] * 3})
    assert response.status == 202 and _limits(response)[1] == 1
    response, body = await stack.call("POST", "/v1/renders:batch", alice, json={"items": [render()] * 2})
    assert_problem(response, body, 429, "rate_limited")
    response, _ = await stack.call("POST", "/v1/renders", alice, json=render())
    assert response.status == 202 and _limits(response)[1] == 0


async def test_a_batch_larger_than_the_burst_is_refused_whole(stack: LiveStack) -> None:
    # Once a batch cost at most the burst: 64-item batches outran the per-second limit.
    alice = await _with_project(stack, "alice")
    response, body = await stack.call(
        "POST", "/v1/renders:batch", alice, json={"items": [render()] * (BURST + 1)}
    )
    assert_problem(response, body, 422, "validation_failed")
    assert body["errors"] == [{"field": "items", "message": f"must hold at most {BURST} renders (the burst)"}]
    # It took nothing: a batch of exactly the burst still fits, and a refusal of a batch that does
    # fit names a wait after which it would.
    response, _ = await stack.call("POST", "/v1/renders:batch", alice, json={"items": [render()] * BURST})
    assert response.status == 202 and _limits(response)[1] == 0
    _, renders = await stack.call("GET", "/v1/renders?project=lim", alice)
    assert len(renders["renders"]) == BURST
    response, body = await stack.call("POST", "/v1/renders:batch", alice, json={"items": [render()] * 2})
    assert_problem(response, body, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) == round(2 / RATE)


async def test_an_invalid_submit_still_costs_a_token(stack: LiveStack) -> None:
    # Limits guard the door: a flood of invalid bodies spends tokens like any other.
    alice = await _with_project(stack, "alice")
    response, body = await stack.call("POST", "/v1/renders", alice, json={"project": "lim"})
    assert_problem(response, body, 422, "validation_failed")
    assert _limits(response)[1] == BURST - 1


async def test_gateways_sharing_a_redis_share_each_bucket(stack: LiveStack, redis_url: str) -> None:
    alice = await _with_project(stack, "alice")
    shared = replace(stack.settings, cache_url=redis_url, rate_limit_burst=10)
    async with AsyncExitStack() as exits:
        bases = []
        for _ in range(2):
            port = await exits.enter_async_context(
                gateway_running(replace(shared, port=0), stack.clients, tracer_provider=TracerProvider())
            )
            bases.append(f"http://127.0.0.1:{port}")

        async def submit(i: int) -> int:
            async with stack.http.post(
                f"{bases[i % 2]}/v1/renders", headers=alice, json=render()
            ) as response:
                await response.read()
                return response.status

        # 16 at once, half through each gateway: exactly the burst gets through.
        statuses = await asyncio.gather(*(submit(i) for i in range(16)))
        assert sorted(statuses) == [202] * 10 + [429] * 6


async def test_submits_go_through_when_redis_is_down(
    stack: LiveStack, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await _with_project(stack, "alice")
    dead = replace(stack.settings, port=0, cache_url=f"redis://127.0.0.1:{free_port()}/0")
    async with (
        gateway_running(dead, stack.clients, tracer_provider=TracerProvider()) as port,
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
    ):
        for _ in range(BURST + 2):
            async with http.post(
                f"http://127.0.0.1:{port}/v1/renders", headers=alice, json=render()
            ) as response:
                assert response.status == 202
                assert "RateLimit-Limit" not in response.headers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gateway.limits"]
    assert [r.getMessage() for r in warnings] == ["rate limits suspended: Redis unreachable"]


async def test_too_many_active_renders_is_a_quota_429(stack: LiveStack, tmp_path: Path) -> None:
    alice = await _with_project(stack, "alice")
    generation = GenerationSettings(
        listen="127.0.0.1:0",
        database_url=stack.database_url,
        artifact_dir=tmp_path / "artifacts",
        metadata_addr=stack.settings.addresses.metadata,
        max_active_renders=2,
        drain_grace_s=0.5,
    )
    async with generation_running(generation) as generation_port:
        addresses = Addresses(
            metadata=stack.settings.addresses.metadata, generation=f"127.0.0.1:{generation_port}"
        )
        settings = replace(stack.settings, port=0, addresses=addresses)
        async with gateway_running(settings, tracer_provider=TracerProvider()) as port:
            url = f"http://127.0.0.1:{port}/v1/renders"
            for _ in range(2):  # no worker runs: both stay queued
                async with stack.http.post(url, headers=alice, json=render()) as response:
                    assert response.status == 202
            async with stack.http.post(url, headers=alice, json=render()) as response:
                body = await response.json(content_type=None)
                assert_problem(response, body, 429, "quota_exceeded")
                assert int(response.headers["Retry-After"]) >= 1
                assert _limits(response)[1] == BURST - 3  # the bucket was charged all the same
