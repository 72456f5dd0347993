"""Honest progress over HTTP: under a load of long renders, the start time each queued render is
told (`eta_s`, in lists and on the render) is within half of when it really starts; its place
(`queue_position`) counts what is really ahead; a running render's `remaining_s`, when it ends.
Real services, one worker with four slots, the procedural backend taking STEP_MS a step."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import quick_gateway_settings
from tests.support.gateway_stack import LiveStack, StartWorker, procedural_worker

STEP_MS = 20.0
SLOTS = 4
PARAMS: dict[str, Any] = {"width": 64, "height": 64, "steps": 20}  # about 0.4 s each
TOLERANCE = 0.5
"""The error allowed, as a share of the real wait."""


@pytest.fixture
def stack_worker() -> StartWorker:
    return procedural_worker("eta-test", STEP_MS, concurrency=SLOTS)


@pytest.fixture
def gateway_settings() -> Any:
    return quick_gateway_settings()


async def _ended(stack: LiveStack, headers: dict[str, str], render_id: str) -> None:
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as stream:
        seen = await asyncio.wait_for(read_events(stream), 30)
    assert seen.events[-1]["type"] == "succeeded"


async def test_the_first_twenty_queued_renders_start_within_half_of_their_eta(stack: LiveStack) -> None:
    headers = await stack.user("gus")
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    item = {"project": "art", "kind": "image", "prompt": "a fox", "params": PARAMS}
    # A history of this size to go by.
    warm = await stack.created("POST", "/v1/renders:batch", headers, json={"items": [item] * SLOTS})
    await asyncio.gather(*(_ended(stack, headers, r["id"]) for r in warm["renders"]))

    batch = await stack.created("POST", "/v1/renders:batch", headers, json={"items": [item] * (SLOTS + 20)})
    asked = datetime.now(UTC)
    _, listed = await stack.call("GET", f"/v1/renders?batch_id={batch['id']}&page_size=50", headers)
    told = {r["id"]: (r["queue_position"], r["eta_s"]) for r in listed["renders"] if r["status"] == "queued"}
    left = {r["id"]: r["remaining_s"] for r in listed["renders"] if r["status"] == "running"}
    await asyncio.gather(*(_ended(stack, headers, r["id"]) for r in batch["renders"]))
    _, done = await stack.call("GET", f"/v1/renders?batch_id={batch['id']}&page_size=50", headers)

    queued = [r for r in reversed(done["renders"]) if r["id"] in told][:20]  # in submission order
    assert len(queued) == 20, told
    errors = []
    for place, render in enumerate(queued):
        position, eta_s = told[render["id"]]
        waited = (datetime.fromisoformat(render["started_at"]) - asked).total_seconds()
        assert eta_s is not None and position >= place
        errors.append((round(eta_s, 2), round(waited, 2)))
        assert abs(eta_s - waited) <= TOLERANCE * waited, errors
    # Those already running were told when they would end, as well.
    assert left
    for render in done["renders"]:
        if render["id"] in left:
            ended_in = (datetime.fromisoformat(render["finished_at"]) - asked).total_seconds()
            assert left[render["id"]] is not None
            assert abs(left[render["id"]] - ended_in) <= TOLERANCE * ended_in, (left, ended_in)
