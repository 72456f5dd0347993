"""Tenant isolation, walked over every operation of the served OpenAPI document: a second user who
names the first user's project, chain, rule, render, batch, webhook endpoint or delivery gets 404
(never 403, never the data, never a change to it), and lists show them nothing of the first user's.
An operation added to the spec without a case here fails the walk, so that none is forgotten."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway_stack import (
    RENDER,
    LiveStack,
    Resources,
    procedural_worker,
    running_stack,
    seed_resources,
)
from tests.support.origin import png_bytes

PROBLEM = "application/problem+json"
WEBSOCKET_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


HOOK = "https://example.com/hook"


@dataclass(frozen=True)
class Owner(Resources):
    """The first user's resources, with a webhook endpoint of the project and a delivery (pending:
    no dispatcher runs in this stack) of a render's own webhook."""

    endpoint_id: str
    webhook_render_id: str
    """A render with a webhook of its own, and so deliveries."""
    delivery_id: str
    upload_id: str
    secrets: tuple[str, ...]
    """The user's signing secret and the endpoint's."""


async def seed_owner(stack: LiveStack) -> Owner:
    alice = await seed_resources(stack, "alice", "alpha")
    endpoint = await stack.created(
        "POST",
        f"/v1/projects/{alice.slug}/webhooks",
        alice.headers,
        json={"url": HOOK + "/endpoint", "events": ["queued"]},
    )
    # `queued` is delivered as the render is accepted: its deliveries (to its own webhook and to the
    # endpoint) exist at once, and no later event of it makes more.
    render = await stack.created(
        "POST",
        "/v1/renders",
        alice.headers,
        json={**_render(alice), "webhook": {"url": HOOK, "events": ["queued"]}},
    )
    _, listed = await stack.call("GET", f"/v1/renders/{render['id']}/deliveries", alice.headers)
    (delivery,) = [d for d in listed["deliveries"] if d["endpoint_id"] is None]
    assert len(listed["deliveries"]) == 2
    _, secret = await stack.call("GET", "/v1/webhooks/secret", alice.headers)
    upload = await stack.created(
        "POST", "/v1/uploads", {**alice.headers, "Content-Type": "image/png"}, data=png_bytes()
    )
    return Owner(
        **vars(alice),
        endpoint_id=endpoint["id"],
        webhook_render_id=render["id"],
        delivery_id=delivery["id"],
        upload_id=upload["id"],
        secrets=(secret["secret"], endpoint["secret"]),
    )


@dataclass(frozen=True)
class Case:
    """How the second user calls one operation, and what must come back."""

    status: int = 404
    body: Callable[[Resources], Any] | None = None
    query: Callable[[Resources], dict[str, str]] = lambda _: {}
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""


def _render(owner: Resources) -> dict[str, Any]:
    return {**RENDER, "project": owner.slug}


def _chain_render(owner: Resources) -> dict[str, Any]:
    return {"kind": "image", "prompt": "mine now"}


CASES: dict[str, Case] = {
    # Addressing the first user's resources: 404, exactly as if they did not exist.
    "getProject": Case(),
    "createChain": Case(body=lambda _: {"name": "intruder"}),
    "listChains": Case(),
    "getChain": Case(),
    "listChainRenders": Case(),
    "submitChainRender": Case(body=_chain_render),
    "submitChainRenderAlias": Case(body=_chain_render),
    "createRule": Case(body=lambda _: {"text": "intruder"}),
    "listRules": Case(),
    "updateRule": Case(body=lambda _: {"text": "intruder", "active": False}),
    "deleteRule": Case(),
    "submitRender": Case(body=_render),
    "submitRenderAlias": Case(body=_render),
    "getRender": Case(),
    "cancelRender": Case(),
    "retryRender": Case(),
    "updateRender": Case(body=lambda _: {"priority": 5}),
    "deleteRenderOutput": Case(),
    "watchRender": Case(),
    "watchRenderWebSocket": Case(headers=WEBSOCKET_HANDSHAKE),
    "getRenderOutput": Case(),
    "getBatch": Case(),
    "cancelBatch": Case(),
    "watchBatch": Case(),
    "submitBatch": Case(
        422,
        body=lambda owner: {"items": [_render(owner)]},
        note="a batch names each item whose project does not exist (for this caller) as a 422",
    ),
    "createWebhookEndpoint": Case(body=lambda _: {"url": "https://example.com/intruder"}),
    "listWebhookEndpoints": Case(),
    "getWebhookEndpoint": Case(),
    "updateWebhookEndpoint": Case(body=lambda _: {"enabled": False, "url": "https://example.com/mine"}),
    "deleteWebhookEndpoint": Case(),
    "rotateWebhookEndpointSecret": Case(body=lambda _: {"overlap_s": 0}),
    "listEndpointDeliveries": Case(),
    "listRenderDeliveries": Case(),
    "redeliver": Case(),
    "getUpload": Case(),
    "deleteUpload": Case(),
    "createUpload": Case(422, note="an upload of the caller's own, of a body that is no image"),
    # Lists: nothing of the first user's, and a filter naming their project is a 404.
    "listProjects": Case(200),
    "listRenders": Case(200, query=lambda owner: {"chain_id": owner.chain_id}),
    # The same slug is free for the second user: a 409 would tell that it exists.
    "createProject": Case(201, body=lambda owner: {"slug": owner.slug, "name": "Mine"}),
    # The caller's own signing secret: another than the first user's (who keeps theirs).
    "getWebhookSecret": Case(200),
    "rotateWebhookSecret": Case(200, body=lambda _: {}),
    # Public, about no one's data.
    "apiRoot": Case(200, note="the caller's own user id and links: nothing of the first user's"),
    "apiRootSlash": Case(200),
    "healthz": Case(200),
    "readyz": Case(200),
    "openapi": Case(200),
    "metrics": Case(200),
}
# Last: afterwards the second user has a project of that slug of their own.
LAST = ["createProject"]


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[LiveStack]:
    async with running_stack(database_url, tmp_path, start_worker=procedural_worker("isolation")) as stack:
        yield stack


def _id(template: str, owner: Owner) -> str:
    """What `{id}` names in `template`: a batch, an endpoint, a delivery, or else a render."""
    if template.startswith("/v1/batches/"):
        return owner.batch_id
    if "/webhooks/{id}" in template:
        return owner.endpoint_id
    if template.startswith("/v1/deliveries/"):
        return owner.delivery_id
    if template == "/v1/renders/{id}/deliveries":
        return owner.webhook_render_id
    if template.startswith("/v1/uploads/"):
        return owner.upload_id
    return owner.render_id


def _path(template: str, owner: Owner) -> str:
    values = {
        "slug": owner.slug,
        "chain_id": owner.chain_id,
        "rule_id": owner.rule_id,
        "id": _id(template, owner),
    }
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)


def _secrets(owner: Owner) -> list[str]:
    return [
        owner.chain_id,
        owner.rule_id,
        owner.render_id,
        owner.batch_id,
        owner.endpoint_id,
        owner.webhook_render_id,
        owner.delivery_id,
        owner.upload_id,
        *owner.secrets,
        HOOK,
        "warm light",
        "lighthouse",
    ]


async def test_a_second_user_reaches_nothing_of_the_first(stack: LiveStack) -> None:
    alice = await seed_owner(stack)
    _, project = await stack.call("GET", f"/v1/projects/{alice.slug}", alice.headers)
    secrets = [*_secrets(alice), project["id"]]
    _, endpoint = await stack.call(
        "GET", f"/v1/projects/{alice.slug}/webhooks/{alice.endpoint_id}", alice.headers
    )
    deliveries_path = f"/v1/renders/{alice.webhook_render_id}/deliveries"
    _, deliveries = await stack.call("GET", deliveries_path, alice.headers)
    bob = await stack.user("bob")
    _, spec = await stack.call("GET", "/openapi.json")
    operations = {
        op["operationId"]: (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
    }
    assert not operations.keys() - CASES.keys(), "operations without an isolation case"
    assert not CASES.keys() - operations.keys(), "cases of operations that no longer exist"

    # A filter naming the first user's project is a 404 too (the walk filters by their chain).
    response, document = await stack.call("GET", "/v1/renders", bob, params={"project": alice.slug})
    assert (response.status, document["code"]) == (404, "not_found")

    order = sorted(operations, key=lambda op: (op in LAST, op))
    for operation_id in order:
        method, template = operations[operation_id]
        case = CASES[operation_id]
        body = case.body(alice) if case.body else None
        path, query = _path(template, alice), case.query(alice)
        response, document = await stack.call(
            method,
            path,
            {**bob, **case.headers},
            params=query,
            **({"json": body} if body is not None else {}),
        )
        where = f"{operation_id}: {method} {template}"
        assert response.status != 403, where
        assert response.status == case.status, (where, response.status, document)
        if case.status >= 400:
            assert response.content_type == PROBLEM, where
            assert document["code"] == ("not_found" if case.status == 404 else "validation_failed"), where
        if operation_id not in ("healthz", "readyz", "openapi", "metrics"):
            # What the caller sent may come back (`render <id> not found`); nothing else of the first user's.
            sent, text = repr((path, query, body)), repr(document)
            assert not [s for s in secrets if s in text and s not in sent], (where, document)

    # And nothing of the first user's changed.
    _, rules = await stack.call("GET", f"/v1/projects/{alice.slug}/rules", alice.headers)
    assert [(r["id"], r["text"], r["active"]) for r in rules["rules"]] == [
        (alice.rule_id, "warm light", True)
    ]
    _, chains = await stack.call("GET", f"/v1/projects/{alice.slug}/chains", alice.headers)
    assert sorted(c["name"] for c in chains["chains"]) == ["default", "second"]
    _, renders = await stack.call("GET", "/v1/renders", alice.headers, params={"project": alice.slug})
    assert len(renders["renders"]) == 4  # the seeded render, the batch's two, the one with a webhook
    _, still = await stack.call(
        "GET", f"/v1/projects/{alice.slug}/webhooks/{alice.endpoint_id}", alice.headers
    )
    assert still == endpoint
    _, secret = await stack.call("GET", "/v1/webhooks/secret", alice.headers)
    assert secret == {"secret": alice.secrets[0], "previous_expires_at": None}
    _, still_delivering = await stack.call("GET", deliveries_path, alice.headers)
    assert still_delivering == deliveries
    _, render = await stack.call("GET", f"/v1/renders/{alice.render_id}", alice.headers)
    assert render["status"] == "succeeded"
    upload, _ = await stack.call("GET", f"/v1/uploads/{alice.upload_id}", alice.headers)
    assert upload.status == 200


async def test_another_user_s_render_is_no_reference(stack: LiveStack) -> None:
    alice = await seed_resources(stack, "alice", "alpha")
    bob = await seed_resources(stack, "bob", "beta")
    render = await stack.created(
        "POST",
        "/v1/renders",
        {**bob.headers, "Prefer": "wait=20"},
        json={**RENDER, "project": bob.slug, "reference": {"render_id": alice.render_id, "required": True}},
    )
    # As for a render that does not exist: the reference is not found, and nothing of it was used.
    assert render["status"] == "failed", render
    assert (render["error"]["code"], render["error"]["reason"]) == ("reference_fetch_failed", "not_found")
