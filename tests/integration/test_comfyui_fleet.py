"""Renderflow in front of a fleet of ComfyUI instances, end to end: the gateway, the services and a
worker whose images are made by the comfyui backend over three stand-in ComfyUI servers
(tests/support/comfyui.py). Many users' renders all succeed with every sampler step on their event
streams; an instance that dies mid-render loses none of them; a cancel over HTTP interrupts that
render's prompt and no other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from services.generation.backends.comfyui import ComfyUISettings
from services.generation.backends.comfyui_workflows import Workflows
from services.generation.backends.selection import BackendSettings
from tests.integration.test_gateway_renders import read_events
from tests.support.comfyui import ComfyUIStandIn
from tests.support.gateway_stack import LiveStack, StartWorker, in_process_worker

STEPS = 8
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture
async def fleet() -> AsyncIterator[list[ComfyUIStandIn]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(ComfyUIStandIn(step_s=0.01, cache=False)) for _ in range(3)]


@pytest.fixture
def stack_worker(fleet: list[ComfyUIStandIn]) -> StartWorker:
    comfyui = ComfyUISettings(
        instances=tuple((comfy.url, 1) for comfy in fleet),
        workflows=Workflows.load("", image="txt2img", reference="img2img", video=""),
        poll_s=0.5,
        request_timeout_s=2.0,
        health_s=0.1,
        unavailable_wait_s=5.0,
        backoff_s=0.01,
    )
    backend = BackendSettings(image="comfyui", video="procedural", comfyui=comfyui)
    # Every progress event written (none coalesced): the streams show each step.
    return in_process_worker("comfyui-fleet", len(fleet), backend=backend, progress_interval_s=0.0)


async def _follow(stack: LiveStack, headers: dict[str, str], render_id: str) -> list[dict[str, Any]]:
    """The render's events, from the first to its end."""
    url = f"{stack.base}/v1/renders/{render_id}/events"
    async with stack.http.get(url, headers=headers) as response:
        assert response.status == 200
        return (await asyncio.wait_for(read_events(response), 60)).events


async def test_many_users_renders_all_succeed_with_every_step_though_an_instance_dies(
    stack: LiveStack, fleet: list[ComfyUIStandIn]
) -> None:
    users = [await stack.user(f"user-{n}") for n in range(3)]
    renders: list[tuple[dict[str, str], str]] = []
    for headers in users:
        await stack.call("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
        params = {"width": 64, "height": 64, "steps": STEPS}
        items = [
            {"project": "art", "kind": "image", "prompt": f"fox {n}", "params": params} for n in range(20)
        ]
        response, batch = await stack.call("POST", "/v1/renders:batch", headers, json={"items": items})
        assert response.status == 202, batch
        renders += [(headers, render["id"]) for render in batch["renders"]]
    streams = [asyncio.create_task(_follow(stack, headers, render_id)) for headers, render_id in renders]

    victim = fleet[0]
    dying_prompt = await victim.started(step=3, timeout_s=30)
    await victim.die()
    events = await asyncio.gather(*streams)

    ends = [stream[-1]["type"] for stream in events]
    assert ends == ["succeeded"] * 60
    for stream in events:
        steps = [round(e["progress"] * STEPS) for e in stream if e["type"] == "progress"]
        assert steps == list(range(1, STEPS + 1)), steps  # every step, once, in order (failover too)
    finished = [
        await stack.call("GET", f"/v1/renders/{render_id}", headers) for headers, render_id in renders
    ]
    prompts = {render["provider_request_id"] for _, render in finished}
    assert dying_prompt not in prompts  # the render it held was made again elsewhere
    assert len(prompts) == 60 and {render["backend"] for _, render in finished} == {"comfyui"}
    survivors = set().union(*(comfy.prompts for comfy in fleet[1:]))
    assert sum(prompt in survivors for prompt in prompts) >= 60 - len(victim.history)


async def test_a_cancel_interrupts_that_renders_prompt_and_no_other(
    stack: LiveStack, fleet: list[ComfyUIStandIn]
) -> None:
    for comfy in fleet:
        comfy.hold_at_step = 2
    users, ids = [], []
    for seed in (11, 12, 13):  # three users: one user's renders would leave a slot free for others
        headers = await stack.user(f"user-{seed}")
        await stack.call("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
        request = {"project": "art", "kind": "image", "prompt": "fox", "params": {"seed": seed, "steps": 4}}
        _, render = await stack.call("POST", "/v1/renders", headers, json=request)
        users.append(headers)
        ids.append(render["id"])
    held = await asyncio.gather(*(comfy.started(step=2, timeout_s=30) for comfy in fleet))
    by_seed = {
        comfy.prompts[prompt]["3"]["inputs"]["seed"]: (comfy, prompt)
        for comfy, prompt in zip(fleet, held, strict=True)
    }
    target, target_prompt = by_seed[11]

    response, _ = await stack.call("POST", f"/v1/renders/{ids[0]}:cancel", users[0])
    assert response.status in (200, 202)
    await target.wait_for(lambda: target_prompt in target.interrupts, timeout_s=10)
    for comfy in fleet:
        comfy.hold_at_step = None
        comfy.release()
    ends = await asyncio.gather(
        *(_follow(stack, *user_render) for user_render in zip(users, ids, strict=True))
    )

    assert [stream[-1]["type"] for stream in ends] == ["cancelled", "succeeded", "succeeded"]
    assert [comfy.interrupt_requests for comfy in fleet if comfy is target] == [[target_prompt]]
    assert all(comfy.interrupt_requests == [] for comfy in fleet if comfy is not target)
