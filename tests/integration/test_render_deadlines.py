"""Deadlines and execution timeouts over HTTP, against the real services and one worker slot: a
render not started by its deadline ends `expired` within a second of it (never started, never
counted as a failure); one still running at it is cancelled with reason `deadline`; `timeout_s`
fails a render that runs longer; a batch's deadline is each item's; bad deadlines are 422s."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_gateway_renders import read_events
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker

STEP_MS = 20.0
QUICK: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
LONG: dict[str, Any] = {"width": 64, "height": 64, "steps": 150}  # 3 s at STEP_MS


@pytest.fixture
def stack_worker() -> StartWorker:
    return procedural_worker("deadlines-test", STEP_MS, concurrency=1)


async def _setup(stack: LiveStack) -> dict[str, str]:
    headers = await stack.user("dana")
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    return headers


async def _submit(stack: LiveStack, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"project": "art", "kind": "image", "prompt": "a fox", "params": QUICK, **fields}
    render: dict[str, Any] = await stack.created("POST", "/v1/renders", headers, json=body)
    return render


async def _end(stack: LiveStack, headers: dict[str, str], render_id: str) -> dict[str, Any]:
    """The render once its event stream has ended, with the types of its events."""
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as stream:
        seen = await asyncio.wait_for(read_events(stream), 20)
    _, render = await stack.call("GET", f"/v1/renders/{render_id}", headers)
    render["event_types"] = [event["type"] for event in seen.events]
    return dict(render)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_render_not_started_by_its_deadline_expires_within_a_second(stack: LiveStack) -> None:
    headers = await _setup(stack)
    busy = await _submit(stack, headers, params=LONG)  # holds the only slot
    waiting = await _submit(stack, headers, deadline=0.5)
    assert waiting["status"] == "queued" and waiting["deadline"] is not None

    expired = await _end(stack, headers, waiting["id"])

    assert expired["status"] == "expired" and expired["event_types"] == ["queued", "expired"]
    assert expired["started_at"] is None and expired["attempts"] == 0
    assert (expired["error"]["code"], expired["error"]["reason"]) == ("expired", "deadline")
    late = (_at(expired["finished_at"]) - _at(expired["deadline"])).total_seconds()
    assert 0 <= late < 1.0
    # Listed as what it is.
    _, listed = await stack.call("GET", "/v1/renders?status=expired", headers)
    assert [r["id"] for r in listed["renders"]] == [waiting["id"]]
    await stack.call("POST", f"/v1/renders/{busy['id']}:cancel", headers)


async def test_a_render_still_running_at_its_deadline_is_cancelled_for_it(stack: LiveStack) -> None:
    headers = await _setup(stack)
    render = await _submit(stack, headers, params=LONG, deadline=0.6)

    ended = await _end(stack, headers, render["id"])

    assert ended["status"] == "cancelled" and "started" in ended["event_types"]
    assert (ended["error"]["code"], ended["error"]["reason"]) == ("cancelled", "deadline")
    assert _at(ended["finished_at"]) - _at(ended["deadline"]) < timedelta(seconds=1)


async def test_timeout_s_fails_a_render_that_runs_longer(stack: LiveStack) -> None:
    headers = await _setup(stack)
    slow = await _submit(stack, headers, params=LONG, timeout_s=0.3)
    quick = await _submit(stack, headers, timeout_s=30)

    failed, done = await _end(stack, headers, slow["id"]), await _end(stack, headers, quick["id"])

    assert failed["status"] == "failed" and failed["timeout_s"] == 0.3
    assert (failed["error"]["code"], failed["error"]["reason"]) == ("timeout", "timeout_s")
    assert done["status"] == "succeeded" and done["timeout_s"] == 30


async def test_a_batch_deadline_is_each_items_unless_it_states_its_own(stack: LiveStack) -> None:
    headers = await _setup(stack)
    own = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    item = {"project": "art", "kind": "image", "prompt": "a fox", "params": QUICK}
    batch = await stack.created(
        "POST",
        "/v1/renders:batch",
        headers,
        json={"deadline": 600, "items": [item, {**item, "deadline": own}]},
    )
    first, second = batch["renders"]
    assert 590 < (_at(first["deadline"]) - datetime.now(UTC)).total_seconds() <= 600
    assert _at(second["deadline"]) == _at(own)


@pytest.mark.parametrize(
    ("deadline", "says"),
    [
        ("2020-01-01T00:00:00Z", "must be in the future"),
        ("tomorrow", "RFC 3339"),
        ("2030-01-01T00:00:00", "time zone"),
        (-1, "seconds from now"),
    ],
)
async def test_a_bad_deadline_is_refused_naming_it(stack: LiveStack, deadline: Any, says: str) -> None:
    headers = await _setup(stack)
    body = {"project": "art", "kind": "image", "prompt": "a fox", "deadline": deadline}
    response, problem = await stack.call("POST", "/v1/renders", headers, json=body)
    assert_problem(response, problem, 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == ["deadline"] and says in problem["errors"][0]["message"]
    _, listed = await stack.call("GET", "/v1/renders", headers)
    assert listed["renders"] == []
