"""Webhooks at the gateway: requests name a render's webhook and an endpoint's fields as the schemas
say (the URL's address is generation's to judge), the webhook reaches the RenderSpec, and endpoints,
secrets and deliveries become the JSON of the contract."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from renderflow.v1 import generation_pb2

from gateway.openapi import SPEC
from gateway.resources import delivery_json, webhook_endpoint_json, webhook_secret_json
from gateway.schemas import MAX_WEBHOOK_DESCRIPTION, WEBHOOK_EVENTS
from gateway.submission import render_spec
from gateway.validation import validate
from services.generation.domain import WEBHOOK_EVENTS as GENERATION_EVENTS
from services.generation.webhooks.api import MAX_DESCRIPTION
from shared.contract import MAX_URL
from shared.errors import ValidationFailed

SCHEMAS = SPEC["components"]["schemas"]
RENDER = {"project": "demo", "kind": "image", "prompt": "a fox"}
HOOK = {"url": "https://example.com/hook"}


def _fields(document: Any, schema: str) -> set[str]:
    try:
        validate(document, schema)
    except ValidationFailed as failed:
        return {error.field for error in failed.errors}
    return set()


def _at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def test_the_schemas_state_generation_s_events_and_limits() -> None:
    assert list(GENERATION_EVENTS) == WEBHOOK_EVENTS
    assert MAX_WEBHOOK_DESCRIPTION == MAX_DESCRIPTION
    assert SCHEMAS["WebhookInput"]["properties"]["url"]["maxLength"] == MAX_URL
    assert SCHEMAS["Delivery"]["properties"]["event"]["enum"] == WEBHOOK_EVENTS


def test_a_render_s_webhook_is_checked_for_its_shape() -> None:
    for schema, body in (("RenderRequest", RENDER), ("ChainRenderRequest", {"kind": "image", "prompt": "p"})):
        assert _fields({**body, "webhook": HOOK}, schema) == set()
        assert _fields({**body, "webhook": {**HOOK, "events": WEBHOOK_EVENTS}}, schema) == set()
        assert _fields({**body, "webhook": {"url": "ftp://x"}}, schema) == {"webhook.url"}
        assert _fields({**body, "webhook": {"url": "https://e/" + "x" * MAX_URL}}, schema) == {"webhook.url"}
        assert _fields({**body, "webhook": {"events": ["completed"]}}, schema) == {"webhook.url"}
        assert _fields({**body, "webhook": {**HOOK, "events": ["done"]}}, schema) == {"webhook.events[0]"}
        for events in ([], ["queued", "queued"], "completed"):
            assert _fields({**body, "webhook": {**HOOK, "events": events}}, schema) == {"webhook.events"}
        assert _fields({**body, "webhook": {**HOOK, "secret": "x"}}, schema) == {"webhook.secret"}
    batch = {"items": [RENDER, {**RENDER, "webhook": HOOK}], "webhook": {**HOOK, "events": ["queued"]}}
    assert _fields(batch, "BatchRequest") == set()
    assert _fields({"items": [{**RENDER, "webhook": {"url": "x"}}]}, "BatchRequest") == {
        "items[0].webhook.url"
    }


def test_endpoint_requests() -> None:
    assert _fields({"url": "https://example.com/h"}, "CreateWebhookEndpointRequest") == set()
    assert _fields({}, "CreateWebhookEndpointRequest") == {"url"}
    long = "x" * (MAX_WEBHOOK_DESCRIPTION + 1)
    assert _fields({"url": "https://e/h", "description": long}, "CreateWebhookEndpointRequest") == {
        "description"
    }
    assert _fields({"enabled": False}, "UpdateWebhookEndpointRequest") == set()
    assert _fields({"description": ""}, "UpdateWebhookEndpointRequest") == set()
    with pytest.raises(ValidationFailed) as refused:
        validate({}, "UpdateWebhookEndpointRequest")
    assert [(e.field, e.message) for e in refused.value.errors] == [
        ("", "must change url, events, description or enabled")
    ]
    assert _fields({"enabled": "no"}, "UpdateWebhookEndpointRequest") == {"enabled"}
    assert _fields({}, "RotateWebhookSecretRequest") == set()
    assert _fields({"overlap_s": 0}, "RotateWebhookSecretRequest") == set()
    assert _fields({"overlap_s": -1}, "RotateWebhookSecretRequest") == {"overlap_s"}
    assert _fields({"overlap_s": 1e300}, "RotateWebhookSecretRequest") == {"overlap_s"}


def test_the_webhook_reaches_the_render_spec() -> None:
    assert not render_spec({**RENDER}, "demo", None).HasField("webhook")
    spec = render_spec({**RENDER, "webhook": HOOK}, "demo", None)
    assert spec.webhook == generation_pb2.WebhookSubscription(url=HOOK["url"], events=["completed"])
    spec = render_spec({**RENDER, "webhook": {**HOOK, "events": ["queued", "completed"]}}, "demo", None)
    assert list(spec.webhook.events) == ["queued", "completed"]


def test_an_endpoint_as_json_shows_its_secret_only_when_given() -> None:
    endpoint = generation_pb2.WebhookEndpoint(
        id="e1",
        project="demo",
        url="https://example.com/h",
        events=["queued", "completed"],
        state="enabled",
        created_at=_at(1_700_000_000),
    )
    body = webhook_endpoint_json(endpoint)
    assert body == {
        "id": "e1",
        "project": "demo",
        "url": "https://example.com/h",
        "events": ["queued", "completed"],
        "description": "",
        "state": "enabled",
        "disabled_reason": None,
        "failing_since": None,
        "created_at": "2023-11-14T22:13:20Z",
    }
    endpoint.secret = "whsec_abc"
    endpoint.failing_since.CopyFrom(_at(1_700_000_100))
    shown = webhook_endpoint_json(endpoint)
    assert shown["secret"] == "whsec_abc" and shown["failing_since"] == "2023-11-14T22:15:00Z"


def test_secrets_and_deliveries_as_json() -> None:
    assert webhook_secret_json(generation_pb2.WebhookSecret(secret="whsec_a")) == {
        "secret": "whsec_a",
        "previous_expires_at": None,
    }
    delivery = generation_pb2.Delivery(
        id="d1",
        render_id="r1",
        event="completed",
        url="https://example.com/h",
        state="failed",
        attempts=2,
        created_at=_at(1_700_000_000),
        attempt_log=[
            generation_pb2.DeliveryAttempt(
                number=1, at=_at(1_700_000_001), outcome="timeout", latency_ms=10000.0, message="slow"
            ),
            generation_pb2.DeliveryAttempt(
                number=2,
                at=_at(1_700_000_010),
                outcome="http_500",
                status=500,
                latency_ms=12.5,
                response_excerpt="oops",
            ),
        ],
    )
    body = delivery_json(delivery)
    assert body["endpoint_id"] is None and body["next_attempt_at"] is None and body["delivered_at"] is None
    assert [(a["number"], a["outcome"], a["status"]) for a in body["attempt_log"]] == [
        (1, "timeout", None),
        (2, "http_500", 500),
    ]
    assert body["attempt_log"][1]["response_excerpt"] == "oops"
    assert set(body) == set(SCHEMAS["Delivery"]["properties"])
