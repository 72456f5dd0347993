"""Controlling renders over HTTP, against the real services and one worker slot: cancel is
idempotent; a batch is cancelled in one go (none of its queued renders starts after it, its running
one is stopped by its worker); a failed, cancelled or expired render is retried as a new render
linked both ways; a queued render's priority changes its turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import Settings as GatewaySettings
from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import quick_gateway_settings
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker

STEP_MS = 20.0
QUICK: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
LONG: dict[str, Any] = {"width": 64, "height": 64, "steps": 150}  # 3 s at STEP_MS


@pytest.fixture
def stack_worker() -> StartWorker:
    return procedural_worker("control-test", STEP_MS, concurrency=1)


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return quick_gateway_settings()  # no rate limit: batches of 50


async def _setup(stack: LiveStack, name: str = "erin") -> dict[str, str]:
    headers = await stack.user(name)
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    return headers


def _request(**fields: Any) -> dict[str, Any]:
    return {"project": "art", "kind": "image", "prompt": "a fox", "params": QUICK, **fields}


async def _submit(stack: LiveStack, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    render: dict[str, Any] = await stack.created("POST", "/v1/renders", headers, json=_request(**fields))
    return render


async def _events(stack: LiveStack, headers: dict[str, str], render_id: str) -> list[str]:
    """The types of the render's events, once its stream has ended."""
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as stream:
        seen = await asyncio.wait_for(read_events(stream), 20)
    return [event["type"] for event in seen.events]


async def _started(stack: LiveStack, headers: dict[str, str], render_id: str) -> None:
    """Returns once the render has started (its `started` event has come)."""
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as stream:
        seen = await asyncio.wait_for(read_events(stream, stop_after=2), 20)
    assert seen.events[-1]["type"] == "started"


async def test_cancel_is_idempotent_and_an_ended_render_is_not_cancelled(stack: LiveStack) -> None:
    headers = await _setup(stack)
    busy = await _submit(stack, headers, params=LONG)
    queued = await _submit(stack, headers)
    path = f"/v1/renders/{queued['id']}:cancel"

    first, cancelled = await stack.call("POST", path, headers)
    again, same = await stack.call("POST", path, headers)

    assert (first.status, cancelled["status"]) == (202, "cancelled")
    assert (again.status, same["status"], same["finished_at"]) == (200, "cancelled", cancelled["finished_at"])
    assert await _events(stack, headers, queued["id"]) == ["queued", "cancelled"]  # one cancel, once
    await stack.call("POST", f"/v1/renders/{busy['id']}:cancel", headers)
    done = await _submit(stack, headers)
    assert (await _events(stack, headers, done["id"]))[-1] == "succeeded"
    response, problem = await stack.call("POST", f"/v1/renders/{done['id']}:cancel", headers)
    assert_problem(response, problem, 409, "conflict")


async def test_a_batch_cancel_leaves_none_of_its_queued_renders_started(stack: LiveStack) -> None:
    headers = await _setup(stack)
    batch = await stack.created(
        "POST", "/v1/renders:batch", headers, json={"items": [_request(params=LONG)] + [_request()] * 50}
    )
    running, *queued = batch["renders"]
    await _started(stack, headers, running["id"])  # the one slot is its

    response, cancelled = await stack.call("POST", f"/v1/batches/{batch['batch_id']}:cancel", headers)

    assert response.status == 202
    counts = cancelled["counts"]
    assert counts["cancelled"] >= 50 and counts["queued"] == 0 and counts["succeeded"] == 0
    for render in queued:
        assert await _events(stack, headers, render["id"]) == ["queued", "cancelled"]
    # The running one was stopped by its worker, for the user.
    assert (await _events(stack, headers, running["id"]))[-1] == "cancelled"
    _, ended = await stack.call("GET", f"/v1/batches/{batch['batch_id']}", headers)
    assert ended["counts"]["cancelled"] == 51
    assert all(r["started_at"] is None for r in ended["renders"][1:])
    assert ended["renders"][0]["error"]["code"] == "cancelled"
    response, again = await stack.call("POST", f"/v1/batches/{batch['batch_id']}:cancel", headers)
    assert response.status == 200 and again["counts"] == ended["counts"]


async def test_a_failed_render_is_retried_as_a_new_render_linked_both_ways(stack: LiveStack) -> None:
    headers = await _setup(stack)
    failed = await _submit(stack, headers, params=LONG, timeout_s=0.2, priority=3)
    assert (await _events(stack, headers, failed["id"]))[-1] == "failed"
    key = {**headers, "Idempotency-Key": "retry-1"}

    response, retry = await stack.call("POST", f"/v1/renders/{failed['id']}:retry", key)
    repeat, same = await stack.call("POST", f"/v1/renders/{failed['id']}:retry", key)

    assert response.status == 202 and response.headers["Location"] == f"/v1/renders/{retry['id']}"
    assert retry["id"] != failed["id"] and retry["retry_of"] == failed["id"]
    assert (repeat.headers["Idempotent-Replayed"], same["id"]) == ("true", retry["id"])
    for name in ("project", "chain_id", "kind", "prompt", "params", "priority", "timeout_s"):
        assert retry[name] == failed[name], name
    assert retry["position"] == failed["position"] + 1  # the chain's next position
    _, original = await stack.call("GET", f"/v1/renders/{failed['id']}", headers)
    assert original["retries"] == [retry["id"]] and original["status"] == "failed"
    assert (await _events(stack, headers, retry["id"]))[-1] == "failed"  # same inputs, same timeout


async def test_only_a_render_that_did_not_succeed_and_has_ended_is_retried(stack: LiveStack) -> None:
    headers = await _setup(stack)
    done = await _submit(stack, headers)
    assert (await _events(stack, headers, done["id"]))[-1] == "succeeded"
    running = await _submit(stack, headers, params=LONG)
    await _started(stack, headers, running["id"])
    queued = await _submit(stack, headers)

    for render in (done, running, queued):
        response, problem = await stack.call("POST", f"/v1/renders/{render['id']}:retry", headers)
        assert_problem(response, problem, 409, "conflict")
    await stack.call("POST", f"/v1/renders/{queued['id']}:cancel", headers)
    response, retry = await stack.call("POST", f"/v1/renders/{queued['id']}:retry", headers)
    assert response.status == 202 and retry["retry_of"] == queued["id"]
    await stack.call("POST", f"/v1/renders/{running['id']}:cancel", headers)
    assert (await _events(stack, headers, retry["id"]))[-1] == "succeeded"


async def test_raising_a_queued_renders_priority_runs_it_sooner(stack: LiveStack) -> None:
    headers = await _setup(stack)
    busy = await _submit(stack, headers, params={**LONG, "steps": 25})  # 0.5 s
    await _started(stack, headers, busy["id"])
    first, second = await _submit(stack, headers), await _submit(stack, headers)

    response, raised = await stack.call(
        "PATCH", f"/v1/renders/{second['id']}", headers, json={"priority": 10}
    )

    assert response.status == 200 and raised["priority"] == 10 and raised["status"] == "queued"
    for render in (first, second):
        assert (await _events(stack, headers, render["id"]))[-1] == "succeeded"
    _, a = await stack.call("GET", f"/v1/renders/{first['id']}", headers)
    _, b = await stack.call("GET", f"/v1/renders/{second['id']}", headers)
    assert b["started_at"] < a["started_at"]
    response, problem = await stack.call("PATCH", f"/v1/renders/{first['id']}", headers, json={"priority": 1})
    assert_problem(response, problem, 409, "conflict")
    response, problem = await stack.call(
        "PATCH", f"/v1/renders/{first['id']}", headers, json={"priority": 5000}
    )
    assert_problem(response, problem, 422, "validation_failed")
