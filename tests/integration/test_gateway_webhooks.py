"""Webhooks through the gateway, against the real stack: a project's endpoints from creation to
deletion (the secret shown once), the user's signing secret and its rotation, receivers on private
addresses refused in every spelling wherever a URL is given, a render's webhook and its deliveries
(no dispatcher runs here, so they stay `pending`), redelivery, pagination, and other users' 404s."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_gateway_renders import read_events
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker

HOOK = "https://example.com/hook"
PRIVATE_URLS = [
    "http://127.0.0.1/x",
    "http://2130706433/",  # 127.0.0.1 as one number
    "http://[::1]/",
    "http://localhost/h",
    "http://10.1.2.3/h",
    "http://169.254.169.254/latest/meta-data/",
]
NOT_HTTP = "ftp://x"
RENDER = {"kind": "image", "prompt": "a lighthouse", "params": {"width": 64, "height": 64, "steps": 2}}
ENDPOINT_FIELDS = {
    "id",
    "project",
    "url",
    "events",
    "description",
    "state",
    "disabled_reason",
    "failing_since",
    "created_at",
}
DELIVERY_FIELDS = {
    "id",
    "render_id",
    "endpoint_id",
    "event",
    "url",
    "state",
    "attempts",
    "created_at",
    "next_attempt_at",
    "delivered_at",
    "attempt_log",
}


@pytest.fixture
def stack_worker(worker_step_ms: float) -> StartWorker:
    return procedural_worker("webhooks-test", worker_step_ms)


async def _user_with_project(stack: LiveStack, name: str, slug: str = "art") -> dict[str, str]:
    headers = await stack.user(name)
    await stack.created("POST", "/v1/projects", headers, json={"slug": slug, "name": slug.title()})
    return headers


async def _submitted(stack: LiveStack, headers: dict[str, str], **request: Any) -> dict[str, Any]:
    response, render = await stack.call("POST", "/v1/renders", headers, json={**RENDER, **request})
    assert response.status == 202, render
    return dict(render)


async def _finished(stack: LiveStack, headers: dict[str, str], render_id: str) -> dict[str, Any]:
    """The render once it has ended, waited for on its event stream (bounded)."""
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as response:
        assert response.status == 200
        stream = await asyncio.wait_for(read_events(response), 20)
    assert stream.events[-1]["type"] == "succeeded", stream.events
    _, render = await stack.call("GET", f"/v1/renders/{render_id}", headers)
    return dict(render)


async def _all_pages(stack: LiveStack, headers: dict[str, str], path: str) -> list[list[dict[str, Any]]]:
    """Every page of a delivery list, one delivery a page."""
    pages: list[list[dict[str, Any]]] = []
    token: str | None = None
    while True:
        params = {"page_size": "1", **({"page_token": token} if token else {})}
        response, body = await stack.call("GET", path, headers, params=params)
        assert response.status == 200, body
        pages.append(body["deliveries"])
        token = body["next_page_token"]
        if token is None:
            return pages
        assert len(pages) < 20, "pagination does not end"


def _fields_named(body: dict[str, Any]) -> list[str]:
    return [error["field"] for error in body["errors"]]


async def test_an_endpoint_from_creation_to_deletion(stack: LiveStack) -> None:
    alice = await _user_with_project(stack, "alice")
    response, created = await stack.call(
        "POST",
        "/v1/projects/art/webhooks",
        alice,
        json={"url": HOOK, "events": ["completed", "queued"], "description": "ops"},
    )
    assert response.status == 201, created
    path = f"/v1/projects/art/webhooks/{created['id']}"
    assert response.headers["Location"] == path and response.headers["Cache-Control"] == "no-store"
    assert set(created) == ENDPOINT_FIELDS | {"secret"}
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["queued", "completed"]  # each once, in their natural order
    assert (created["project"], created["url"], created["description"]) == ("art", HOOK, "ops")
    assert (created["state"], created["disabled_reason"], created["failing_since"]) == ("enabled", None, None)
    assert created["created_at"].endswith("Z")
    shown = {name: value for name, value in created.items() if name != "secret"}

    # The secret is shown once: never again, in a list or alone.
    response, listed = await stack.call("GET", "/v1/projects/art/webhooks", alice)
    assert response.status == 200 and listed == {"webhooks": [shown]}
    response, got = await stack.call("GET", path, alice)
    assert response.status == 200 and got == shown

    response, default = await stack.call("POST", "/v1/projects/art/webhooks", alice, json={"url": HOOK + "2"})
    assert response.status == 201 and default["events"] == ["completed"] and default["description"] == ""

    response, disabled = await stack.call("PATCH", path, alice, json={"enabled": False})
    assert response.status == 200 and disabled["state"] == "disabled" and "secret" not in disabled
    assert disabled["disabled_reason"]
    response, enabled = await stack.call(
        "PATCH", path, alice, json={"enabled": True, "events": ["started"], "description": "changed"}
    )
    assert response.status == 200, enabled
    assert (enabled["state"], enabled["disabled_reason"]) == ("enabled", None)
    assert (enabled["events"], enabled["description"], enabled["url"]) == (["started"], "changed", HOOK)
    response, body = await stack.call("PATCH", path, alice, json={})
    assert_problem(response, body, 422, "validation_failed")

    response, rotated = await stack.call("POST", f"{path}:rotate-secret", alice, json={"overlap_s": 60})
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    expires = datetime.fromisoformat(rotated["previous_expires_at"])
    assert timedelta(seconds=50) < expires - datetime.now(UTC) < timedelta(seconds=70)
    response, again = await stack.call("POST", f"{path}:rotate-secret", alice)  # no body: the default
    assert response.status == 200 and again["secret"] not in (created["secret"], rotated["secret"])

    response, body = await stack.call("DELETE", path, alice)
    assert response.status == 204 and body is None
    for method in ("GET", "DELETE"):
        response, body = await stack.call(method, path, alice)
        assert_problem(response, body, 404, "not_found")
    response, body = await stack.call("PATCH", path, alice, json={"enabled": True})
    assert_problem(response, body, 404, "not_found")
    response, listed = await stack.call("GET", "/v1/projects/art/webhooks", alice)
    assert [e["id"] for e in listed["webhooks"]] == [default["id"]]
    response, body = await stack.call("GET", "/v1/projects/art/webhooks/not-an-id", alice)
    assert_problem(response, body, 404, "not_found")
    response, body = await stack.call("GET", "/v1/projects/nope/webhooks", alice)
    assert_problem(response, body, 404, "not_found")


async def test_the_user_s_signing_secret_and_its_rotation(stack: LiveStack) -> None:
    alice = await stack.user("alice")
    response, first = await stack.call("GET", "/v1/webhooks/secret", alice)
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    assert first["secret"].startswith("whsec_") and first["previous_expires_at"] is None
    _, same = await stack.call("GET", "/v1/webhooks/secret", alice)
    assert same == first

    response, rotated = await stack.call("POST", "/v1/webhooks/secret:rotate", alice, json={})
    assert response.status == 200, rotated
    assert rotated["secret"] != first["secret"]
    expires = datetime.fromisoformat(rotated["previous_expires_at"])  # the default overlap: 24 h
    assert timedelta(hours=23) < expires - datetime.now(UTC) <= timedelta(hours=24)
    _, now = await stack.call("GET", "/v1/webhooks/secret", alice)
    assert now == rotated

    response, body = await stack.call("POST", "/v1/webhooks/secret:rotate", alice, json={"overlap_s": -1})
    assert_problem(response, body, 422, "validation_failed")
    assert _fields_named(body) == ["overlap_s"]

    bob = await stack.user("bob")
    _, theirs = await stack.call("GET", "/v1/webhooks/secret", bob)
    assert theirs["secret"] not in (first["secret"], rotated["secret"])


@pytest.mark.parametrize("url", [*PRIVATE_URLS, NOT_HTTP])
async def test_a_receiver_on_a_private_address_is_refused_wherever_it_is_named(
    stack: LiveStack, url: str
) -> None:
    alice = await _user_with_project(stack, "alice")
    refusals: list[tuple[str, str, dict[str, Any], str]] = [
        ("POST", "/v1/projects/art/webhooks", {"url": url}, "url"),
        ("POST", "/v1/renders", {**RENDER, "project": "art", "webhook": {"url": url}}, "webhook.url"),
        (
            "POST",
            "/v1/renders:batch",
            {"items": [{**RENDER, "project": "art", "webhook": {"url": url, "events": ["queued"]}}]},
            "items[0].webhook.url",
        ),
        (
            "POST",
            "/v1/renders:batch",
            {"items": [{**RENDER, "project": "art"}], "webhook": {"url": url}},
            # The batch's own field when its shape is wrong; else the first item it applies to.
            "webhook.url" if url == NOT_HTTP else "items[0].webhook.url",
        ),
    ]
    _, project = await stack.call("GET", "/v1/projects/art", alice)
    chain = f"/v1/projects/art/chains/{project['default_chain_id']}/renders"
    refusals.append(("POST", chain, {**RENDER, "webhook": {"url": url}}, "webhook.url"))
    endpoint = await stack.created("POST", "/v1/projects/art/webhooks", alice, json={"url": HOOK})
    refusals.append(("PATCH", f"/v1/projects/art/webhooks/{endpoint['id']}", {"url": url}, "url"))

    for method, path, request, field in refusals:
        response, body = await stack.call(method, path, alice, json=request)
        assert_problem(response, body, 422, "validation_failed")
        assert _fields_named(body) == [field], (path, body)
        if url != NOT_HTTP:  # refused by generation, which says why without echoing the address back
            assert "public address" in body["errors"][0]["message"], body

    # Nothing was queued or changed.
    _, renders = await stack.call("GET", "/v1/renders", alice)
    assert renders["renders"] == []
    _, still = await stack.call("GET", f"/v1/projects/art/webhooks/{endpoint['id']}", alice)
    assert still["url"] == HOOK


async def test_a_render_s_webhook_and_its_deliveries(stack: LiveStack) -> None:
    alice = await _user_with_project(stack, "alice")
    render = await _submitted(stack, alice, project="art", webhook={"url": HOOK})
    assert render["webhook"] == {"url": HOOK, "events": ["completed"]}
    plain = await _submitted(stack, alice, project="art")
    assert plain["webhook"] is None

    done = await _finished(stack, alice, render["id"])
    assert done["webhook"] == render["webhook"]
    response, listed = await stack.call("GET", f"/v1/renders/{render['id']}/deliveries", alice)
    assert response.status == 200, listed
    assert listed["next_page_token"] is None and len(listed["deliveries"]) == 1
    delivery = listed["deliveries"][0]
    assert set(delivery) == DELIVERY_FIELDS
    assert (delivery["render_id"], delivery["endpoint_id"], delivery["event"], delivery["url"]) == (
        render["id"],
        None,
        "completed",
        HOOK,
    )
    # No dispatcher runs in this stack: the delivery waits, untried.
    assert (delivery["state"], delivery["attempts"], delivery["attempt_log"]) == ("pending", 0, [])
    assert delivery["delivered_at"] is None and delivery["next_attempt_at"].endswith("Z")
    assert delivery["created_at"].endswith("Z")

    response, redelivered = await stack.call("POST", f"/v1/deliveries/{delivery['id']}:redeliver", alice)
    assert response.status == 202, redelivered
    assert redelivered["id"] == delivery["id"] and redelivered["state"] == "pending"

    await _finished(stack, alice, plain["id"])
    _, none = await stack.call("GET", f"/v1/renders/{plain['id']}/deliveries", alice)
    assert none == {"deliveries": [], "next_page_token": None}
    response, body = await stack.call("GET", "/v1/renders/nope/deliveries", alice)
    assert_problem(response, body, 404, "not_found")
    response, body = await stack.call("POST", "/v1/deliveries/nope:redeliver", alice)
    assert_problem(response, body, 404, "not_found")


async def test_deliveries_page_newest_first_for_renders_and_endpoints(stack: LiveStack) -> None:
    alice = await _user_with_project(stack, "alice")
    endpoint = await stack.created(
        "POST",
        "/v1/projects/art/webhooks",
        alice,
        json={"url": HOOK + "/ep", "events": ["queued", "completed"]},
    )
    events = ["queued", "started", "completed"]
    render = await _submitted(stack, alice, project="art", webhook={"url": HOOK, "events": events})
    assert render["webhook"]["events"] == events
    await _finished(stack, alice, render["id"])

    pages = await _all_pages(stack, alice, f"/v1/renders/{render['id']}/deliveries")
    assert all(len(page) == 1 for page in pages)
    deliveries = [page[0] for page in pages]
    assert (
        len({d["id"] for d in deliveries}) == len(deliveries) == 5
    )  # three for the render, two for the endpoint
    assert [d["created_at"] for d in deliveries] == sorted(
        (d["created_at"] for d in deliveries), reverse=True
    )
    own = [d["event"] for d in deliveries if d["endpoint_id"] is None]
    assert own == ["completed", "started", "queued"]
    assert all(d["url"] == HOOK for d in deliveries if d["endpoint_id"] is None)

    path = f"/v1/projects/art/webhooks/{endpoint['id']}/deliveries"
    pages = await _all_pages(stack, alice, path)
    assert [page[0]["event"] for page in pages] == ["completed", "queued"]
    assert all(page[0]["endpoint_id"] == endpoint["id"] for page in pages)
    assert all(page[0]["url"] == HOOK + "/ep" for page in pages)

    response, body = await stack.call("GET", path, alice, params={"page_token": "not-a-token"})
    assert_problem(response, body, 422, "validation_failed")
    assert _fields_named(body) == ["page_token"]
    response, body = await stack.call("GET", path, alice, params={"page_size": "0"})
    assert_problem(response, body, 422, "validation_failed")


async def test_batches_and_chain_renders_carry_webhooks(stack: LiveStack) -> None:
    alice = await _user_with_project(stack, "alice")
    shared = {"url": HOOK, "events": ["queued"]}
    own = {"url": HOOK + "/own", "events": ["completed"]}
    response, batch = await stack.call(
        "POST",
        "/v1/renders:batch",
        alice,
        json={
            "items": [{**RENDER, "project": "art"}, {**RENDER, "project": "art", "webhook": own}],
            "webhook": shared,
        },
    )
    assert response.status == 202, batch
    assert [r["webhook"] for r in batch["renders"]] == [shared, own]
    # `queued` is delivered as the render is accepted: its delivery is there at once.
    _, listed = await stack.call("GET", f"/v1/renders/{batch['renders'][0]['id']}/deliveries", alice)
    assert [(d["event"], d["url"]) for d in listed["deliveries"]] == [("queued", HOOK)]

    _, project = await stack.call("GET", "/v1/projects/art", alice)
    for path in (
        f"/v1/projects/art/chains/{project['default_chain_id']}/renders",
        f"/project/art/chain/{project['default_chain_id']}",
    ):
        response, render = await stack.call("POST", path, alice, json={**RENDER, "webhook": own})
        assert response.status == 202, render
        assert render["webhook"] == own


async def test_other_users_reach_no_webhook_of_yours(stack: LiveStack) -> None:
    alice = await _user_with_project(stack, "alice")
    endpoint = await stack.created("POST", "/v1/projects/art/webhooks", alice, json={"url": HOOK})
    render = await _submitted(stack, alice, project="art", webhook={"url": HOOK, "events": ["queued"]})
    _, listed = await stack.call("GET", f"/v1/renders/{render['id']}/deliveries", alice)
    delivery = listed["deliveries"][0]
    bob = await _user_with_project(stack, "bob")  # a project of the same slug: still not alice's
    path = f"/v1/projects/art/webhooks/{endpoint['id']}"

    for method, target, request in (
        ("GET", path, None),
        ("PATCH", path, {"enabled": False}),
        ("DELETE", path, None),
        ("POST", f"{path}:rotate-secret", {}),
        ("GET", f"{path}/deliveries", None),
        ("GET", f"/v1/renders/{render['id']}/deliveries", None),
        ("POST", f"/v1/deliveries/{delivery['id']}:redeliver", None),
    ):
        response, body = await stack.call(
            method, target, bob, **({"json": request} if request is not None else {})
        )
        assert_problem(response, body, 404, "not_found")
        assert HOOK not in repr(body)
    _, theirs = await stack.call("GET", "/v1/projects/art/webhooks", bob)
    assert theirs == {"webhooks": []}

    _, still = await stack.call("GET", path, alice)
    assert still["state"] == "enabled"
