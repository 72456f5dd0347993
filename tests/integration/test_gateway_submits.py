"""The render API's submits over HTTP against the real services and a worker: idempotent retries
(sequential, racing, and after the key's 24 h), `Prefer: wait` both ways, atomic batches, a chain
of three, the old system's aliases, trace context and Server-Timing."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from gateway.app import running as gateway_running
from gateway.config import Settings as GatewaySettings
from shared.contract import TERMINAL
from tests.integration.test_gateway_renders import read_events
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def quick_gateway_settings() -> GatewaySettings:
    """No rate limit (these tests submit in bursts), short linger and waits."""
    return GatewaySettings(
        port=0,
        sse_heartbeat_s=0.2,
        shutdown_grace_s=1.0,
        watch_linger_s=0.05,
        max_wait_s=2.0,
        rate_limit_per_s=0,
        rate_limit_burst=0,
    )


@pytest.fixture
def stack_worker(worker_step_ms: float, worker_concurrency: int) -> StartWorker:
    return procedural_worker("submits-test", worker_step_ms, worker_concurrency)


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return quick_gateway_settings()


PARAMS: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}
REQUEST: dict[str, Any] = {"project": "art", "kind": "image", "prompt": "a fox", "params": PARAMS}


async def _project(
    stack: LiveStack, name: str = "alice", slug: str = "art"
) -> tuple[dict[str, str], dict[str, Any]]:
    headers = await stack.user(name)
    response, project = await stack.call("POST", "/v1/projects", headers, json={"slug": slug, "name": slug})
    assert response.status == 201, project
    return headers, project


async def _age(stack: LiveStack, render_id: str, hours: float) -> None:
    """Moves a render's creation back in time (as if `hours` had passed)."""
    async with await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE generation.renders SET created_at = created_at - %s * interval '1 hour' WHERE id = %s",
            [hours, render_id],
        )


async def _chain_ids(stack: LiveStack, headers: dict[str, str], slug: str, chain_id: str) -> list[str]:
    _, page = await stack.call("GET", f"/v1/projects/{slug}/chains/{chain_id}/renders", headers)
    return [r["id"] for r in page["renders"]]


async def test_a_retry_with_the_same_key_is_the_same_render_for_24_hours(stack: LiveStack) -> None:
    alice, project = await _project(stack)
    keyed = {**alice, "Idempotency-Key": "retry-1"}
    response, first = await stack.call("POST", "/v1/renders", keyed, json=REQUEST)
    assert response.status == 202 and "Idempotent-Replayed" not in response.headers
    response, again = await stack.call("POST", "/v1/renders", keyed, json=REQUEST)
    assert response.status == 202 and response.headers["Idempotent-Replayed"] == "true"
    assert again["id"] == first["id"] and response.headers["Location"] == f"/v1/renders/{first['id']}"
    response, body = await stack.call("POST", "/v1/renders", keyed, json={**REQUEST, "prompt": "a wolf"})
    assert_problem(response, body, 422, "validation_failed")
    assert body["errors"][0]["field"] == "idempotency_key"

    # Racing repeats: one render, every answer 202 with its id.
    racing = {**alice, "Idempotency-Key": "race-1"}
    answers = await asyncio.gather(
        *(stack.call("POST", "/v1/renders", racing, json={**REQUEST, "prompt": "race"}) for _ in range(12))
    )
    assert {response.status for response, _ in answers} == {202}
    assert len({render["id"] for _, render in answers}) == 1
    race_id = answers[0][1]["id"]
    chain = await _chain_ids(stack, alice, "art", project["default_chain_id"])
    assert chain.count(race_id) == 1 and len(chain) == 2
    # Racing through two gateway processes (each with its own locks): still one render.
    async with gateway_running(replace(stack.settings, port=0)) as other_port:
        other = f"http://127.0.0.1:{other_port}/v1/renders"
        body = {**REQUEST, "prompt": "race across gateways"}
        racing = {**alice, "Idempotency-Key": "race-2"}
        calls = [
            stack.http.post(url, headers=racing, json=body) for url in [other, stack.base + "/v1/renders"] * 6
        ]
        responses = await asyncio.gather(*calls)
        ids = set()
        for response in responses:
            assert response.status == 202
            ids.add((await response.json())["id"])
            response.release()
    assert len(ids) == 1
    _, listed = await stack.call("GET", "/v1/renders?project=art", alice)
    assert [r["prompt"] for r in listed["renders"]].count("race across gateways") == 1

    # After 24 hours the key is free: the same body makes a new render, so does another body.
    await _age(stack, first["id"], 24.5)
    response, renewed = await stack.call("POST", "/v1/renders", keyed, json=REQUEST)
    assert response.status == 202 and "Idempotent-Replayed" not in response.headers
    assert renewed["id"] != first["id"]
    response, repeat = await stack.call("POST", "/v1/renders", keyed, json=REQUEST)
    assert repeat["id"] == renewed["id"] and response.headers["Idempotent-Replayed"] == "true"
    await _age(stack, renewed["id"], 25)
    response, other = await stack.call("POST", "/v1/renders", keyed, json={**REQUEST, "prompt": "a wolf"})
    assert response.status == 202 and other["prompt"] == "a wolf"


@pytest.mark.parametrize("worker_step_ms", [20.0])
async def test_prefer_wait_returns_the_finished_render_or_202_in_time(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    waiting = {**alice, "Prefer": "wait=2"}
    response, done = await stack.call("POST", "/v1/renders", waiting, json=REQUEST)
    assert response.status == 200, done
    assert done["status"] == "succeeded" and done["output"]["content_type"] == "image/png"
    assert response.headers["Preference-Applied"] == "wait=2"
    assert "wait;dur=" in response.headers["Server-Timing"]

    slow = {**REQUEST, "params": {"width": 64, "height": 64, "steps": 150}}  # 3 s of steps
    started = asyncio.get_running_loop().time()
    response, queued = await stack.call(
        "POST", "/v1/renders", {**alice, "Prefer": "respond-async, wait=1"}, json=slow
    )
    elapsed = asyncio.get_running_loop().time() - started
    assert response.status == 202 and queued["status"] in {"queued", "running"}
    assert response.headers["Preference-Applied"] == "wait=1" and 0.9 < elapsed < 3
    # Longer than the gateway's longest wait (2 s here): clamped, and said so.
    response, _ = await stack.call("POST", f"/v1/renders/{queued['id']}:cancel", alice)
    response, cancelled = await stack.call("POST", "/v1/renders", {**alice, "Prefer": "wait=600"}, json=slow)
    assert response.headers["Preference-Applied"] == "wait=2"
    await stack.call("POST", f"/v1/renders/{cancelled['id']}:cancel", alice)
    # Without the preference (or a malformed one): 202 at once, no Preference-Applied.
    response, _ = await stack.call("POST", "/v1/renders", {**alice, "Prefer": "wait=soon"}, json=REQUEST)
    assert response.status == 202 and "Preference-Applied" not in response.headers


async def test_a_batch_is_all_or_nothing(stack: LiveStack) -> None:
    alice, art = await _project(stack)
    _, chain = await stack.call("POST", "/v1/projects/art/chains", alice, json={"name": "story"})
    await stack.call("POST", "/v1/projects", alice, json={"slug": "other", "name": "Other"})
    items = [
        {**REQUEST, "prompt": "one"},
        {**REQUEST, "prompt": "two", "chain_id": chain["id"]},
        {**REQUEST, "prompt": "three"},
        {**REQUEST, "project": "other", "prompt": "four"},
        {**REQUEST, "prompt": "five", "chain_id": chain["id"], "reference": {"previous": True}},
    ]
    bad = [*items[:2], {**items[2], "prompt": ""}, items[3]]
    response, body = await stack.call("POST", "/v1/renders:batch", alice, json={"items": bad})
    assert_problem(response, body, 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["items[2].prompt"]
    unknown = [*items[:1], {**items[1], "project": "nope"}]
    response, body = await stack.call("POST", "/v1/renders:batch", alice, json={"items": unknown})
    assert_problem(response, body, 422, "validation_failed")
    assert [e["field"] for e in body["errors"]] == ["items[1].project"]
    response, body = await stack.call("POST", "/v1/renders:batch", alice, json={"items": [REQUEST] * 65})
    assert_problem(response, body, 422, "validation_failed")
    _, listed = await stack.call("GET", "/v1/renders", alice)
    assert listed["renders"] == []  # nothing was created by the refused batches

    keyed = {**alice, "Idempotency-Key": "batch-1"}
    response, accepted = await stack.call("POST", "/v1/renders:batch", keyed, json={"items": items})
    assert response.status == 202, accepted
    assert response.headers["Location"] == f"/v1/batches/{accepted['batch_id']}"
    renders = accepted["renders"]
    assert [r["prompt"] for r in renders] == ["one", "two", "three", "four", "five"]
    assert {r["batch_id"] for r in renders} == {accepted["batch_id"]}
    # Positions are consecutive per chain, in item order.
    assert [(r["chain_id"], r["position"]) for r in renders] == [
        (art["default_chain_id"], 1),
        (chain["id"], 1),
        (art["default_chain_id"], 2),
        (renders[3]["chain_id"], 1),
        (chain["id"], 2),
    ]
    assert renders[4]["reference"]["previous"] is True and renders[4]["reference"]["required"] is False
    response, again = await stack.call("POST", "/v1/renders:batch", keyed, json={"items": items})
    assert response.status == 202 and again["batch_id"] == accepted["batch_id"]
    assert response.headers["Idempotent-Replayed"] == "true"

    async with stack.http.get(
        f"{stack.base}/v1/batches/{accepted['batch_id']}/events", headers=alice
    ) as stream:
        assert stream.status == 200
        seen = await asyncio.wait_for(read_events(stream, batch=True), 20)
    ended = {e["render_id"]: e["type"] for e in seen.events if e["type"] in TERMINAL}
    assert ended == {r["id"]: "succeeded" for r in renders}
    response, batch = await stack.call("GET", f"/v1/batches/{accepted['batch_id']}", alice)
    assert response.status == 200 and batch["id"] == accepted["batch_id"]
    assert batch["counts"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 5,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
        "total": 5,
    }
    assert [r["id"] for r in batch["renders"]] == [r["id"] for r in renders]
    bob = await stack.user("bob")
    response, body = await stack.call("GET", f"/v1/batches/{accepted['batch_id']}", bob)
    assert_problem(response, body, 404, "not_found")


async def test_a_batch_stream_resumes_after_any_event_without_gap_or_repeat(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    items = [{**REQUEST, "prompt": prompt} for prompt in ("one", "two", "three")]
    response, accepted = await stack.call("POST", "/v1/renders:batch", alice, json={"items": items})
    assert response.status == 202
    url = f"{stack.base}/v1/batches/{accepted['batch_id']}/events"

    async def events_after(cursor: str, **where: str) -> list[tuple[str, int]]:
        headers = {**alice, "Last-Event-ID": cursor} if cursor and not where else alice
        async with stack.http.get(url, headers=headers, params=where) as stream:
            assert stream.status == 200
            seen = await asyncio.wait_for(read_events(stream, batch=True), 20)
        return [(event["render_id"], event["seq"]) for event in seen.events]

    async with stack.http.get(url, headers=alice) as stream:
        full = await asyncio.wait_for(read_events(stream, batch=True), 20)  # live, then ended
    everything = [(event["render_id"], event["seq"]) for event in full.events]
    assert len(set(everything)) == len(everything) and len(full.cursors) == len(everything)
    for seen, cursor in enumerate(full.cursors, start=1):
        assert sorted(await events_after(cursor)) == sorted(everything[seen:]), cursor
    assert sorted(await events_after("", last_event_id=full.cursors[2])) == sorted(everything[3:])

    for bad in ("x", "1..2", "1.2.3.4"):  # not a cursor; more renders than the batch has
        response, body = await stack.call(
            "GET", f"/v1/batches/{accepted['batch_id']}/events", {**alice, "Last-Event-ID": bad}
        )
        assert_problem(response, body, 422, "validation_failed")


async def test_a_chain_of_three_each_from_its_predecessor(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    _, chain = await stack.call("POST", "/v1/projects/art/chains", alice, json={"name": "story"})
    path = f"/v1/projects/art/chains/{chain['id']}/renders"
    body = {"kind": "image", "prompt": "scene", "params": {"width": 64, "height": 64, "steps": 2}}
    response, first = await stack.call("POST", path, alice, json={**body, "prompt": "scene 1"})
    assert response.status == 202 and response.headers["Location"] == f"/v1/renders/{first['id']}"
    _, second = await stack.call("POST", path, alice, json={**body, "prompt": "scene 2"})
    # The old system's chain action is the same operation.
    response, third = await stack.call(
        "POST", f"/project/art/chain/{chain['id']}", alice, json={**body, "prompt": "scene 3"}
    )
    assert response.status == 202
    assert [first["position"], second["position"], third["position"]] == [1, 2, 3]
    assert first["reference"] is None
    for queued in (second, third):  # as submitted: not run yet
        assert queued["reference"] | {"used": None} == {
            "previous": True,
            "required": False,
            "used": None,
            "reason": None,
            "message": None,
            "source_render_id": None,
        }
    for render in (first, second, third):
        async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=alice) as stream:
            seen = await asyncio.wait_for(read_events(stream), 20)
        assert seen.events[-1]["type"] == "succeeded", seen.events
    _, listed = await stack.call("GET", path, alice)
    assert [(r["id"], r["position"], r["status"]) for r in listed["renders"]] == [
        (first["id"], 1, "succeeded"),
        (second["id"], 2, "succeeded"),
        (third["id"], 3, "succeeded"),
    ]
    # Each went on from the one before it, and says so.
    assert [r["reference"] and r["reference"]["source_render_id"] for r in listed["renders"]] == [
        None,
        first["id"],
        second["id"],
    ]
    response, body = await stack.call("POST", "/v1/projects/art/chains/nope/renders", alice, json=body)
    assert_problem(response, body, 404, "not_found")


async def test_the_old_paths_are_the_same_operations(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    response, body = await stack.call("POST", "/render", json=REQUEST)
    assert_problem(response, body, 401, "unauthenticated")
    keyed = {**alice, "Idempotency-Key": "alias-1"}
    response, old = await stack.call("POST", "/render", keyed, json=REQUEST)
    assert response.status == 202 and response.headers["Location"] == f"/v1/renders/{old['id']}"
    response, new = await stack.call("POST", "/v1/renders", keyed, json=REQUEST)
    assert new["id"] == old["id"] and response.headers["Idempotent-Replayed"] == "true"
    response, body = await stack.call("POST", "/render", alice, json={**REQUEST, "kind": "gif"})
    assert_problem(response, body, 422, "validation_failed")
    response, done = await stack.call("POST", "/render", {**alice, "Prefer": "wait=2"}, json=REQUEST)
    assert response.status == 200 and done["status"] == "succeeded"


async def test_the_clients_trace_continues_and_every_response_is_timed(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    traced = {**alice, "traceparent": TRACEPARENT}
    response, render = await stack.call("POST", "/v1/renders", traced, json=REQUEST)
    assert render["trace_id"] == TRACE_ID
    assert response.headers["traceparent"].split("-")[1] == TRACE_ID
    timing = response.headers["Server-Timing"]
    # One call to generation: its lookups of project, chain and rules are on the render (db_ms).
    assert [entry.split(";")[0] for entry in timing.split(", ")] == ["auth", "validation", "enqueue", "total"]
    response, accepted = await stack.call("POST", "/v1/renders:batch", traced, json={"items": [REQUEST]})
    assert accepted["renders"][0]["trace_id"] == TRACE_ID
    response, body = await stack.call("POST", "/v1/renders", traced, json={**REQUEST, "prompt": ""})
    assert_problem(response, body, 422, "validation_failed")
    assert body["trace_id"] == TRACE_ID
    response, body = await stack.call("GET", "/v1/renders/missing", traced)
    assert_problem(response, body, 404, "not_found")
    assert body["trace_id"] == TRACE_ID and "total;dur=" in response.headers["Server-Timing"]
    for path in (f"/v1/renders/{render['id']}", "/v1/renders?status=queued", "/healthz"):
        response, _ = await stack.call("GET", path, alice)
        assert "total;dur=" in response.headers["Server-Timing"], path


async def test_a_render_request_with_a_bad_reference_names_it(stack: LiveStack) -> None:
    alice, _ = await _project(stack)
    both = {**REQUEST, "reference": {"url": "https://example.com/a.png", "previous": True}}
    response, body = await stack.call("POST", "/v1/renders", alice, json=both)
    assert_problem(response, body, 422, "validation_failed")
    assert body["errors"] == [
        {"field": "reference", "message": "must have exactly one of url, render_id, previous and upload_id"}
    ]
    # `previous` on the first render of a chain: there is none, so no reference.
    response, first = await stack.call(
        "POST", "/v1/renders", alice, json={**REQUEST, "reference": {"previous": True}}
    )
    assert response.status == 202 and first["reference"] is None


async def test_a_change_acknowledged_applies_to_the_next_submit_at_once(stack: LiveStack) -> None:
    # Generation reads projects, chains and rules from a cache fed by metadata's change feed; the
    # gateway's acknowledged change (its seq) makes the next submit read at least that fresh.
    alice = await stack.user("alice")
    response, _ = await stack.call("POST", "/v1/projects", alice, json={"slug": "fresh", "name": "F"})
    assert response.status == 201
    response, first = await stack.call("POST", "/v1/renders", alice, json={**REQUEST, "project": "fresh"})
    assert response.status == 202 and first["rules"] == []  # created and submitted to at once
    rule = await stack.created("POST", "/v1/projects/fresh/rules", alice, json={"text": "v0"})
    for round_ in range(1, 101):
        text = f"v{round_}"
        response, _ = await stack.call(
            "PATCH", f"/v1/projects/fresh/rules/{rule['id']}", alice, json={"text": text}
        )
        assert response.status == 200
        response, render = await stack.call(
            "POST", "/v1/renders", alice, json={**REQUEST, "project": "fresh"}
        )
        assert response.status == 202 and render["rules"] == [{"id": rule["id"], "text": text}], round_
    await stack.call("PATCH", f"/v1/projects/fresh/rules/{rule['id']}", alice, json={"active": False})
    response, render = await stack.call("POST", "/v1/renders", alice, json={**REQUEST, "project": "fresh"})
    assert render["rules"] == []
    _, chain = await stack.call("GET", f"/v1/projects/fresh/chains/{render['chain_id']}", alice)
    assert chain["length"] == render["position"] == 102
