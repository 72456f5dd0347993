"""The webhook outbox: the statement that writes a render's events makes the deliveries they cause,
for the render's own webhook and for its project's endpoints, with progress coalesced; receivers
are checked when named. No dispatcher runs here: what is asserted is what is queued to send."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from renderflow.v1 import generation_pb2 as pb

from services.generation.store import database_url as search_path_url
from services.generation.webhooks.store import Delivery, WebhookStore
from shared.errors import FailedPrecondition, NotFound, ValidationFailed
from shared.rpc_errors import rpc_errors
from tests.support.generation import (
    Stub,
    WorkerFactory,
    accounts_of,
    finished,
    status_name,
    submit,
    user_id,
)

HOOK = "https://hooks.example.com/renderflow"


async def _deliveries(database_url: str, render_id: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "SELECT * FROM generation.webhook_deliveries WHERE render_id = %s ORDER BY seq, subscription",
            [render_id],
        )
        return await cur.fetchall()


async def _events(database_url: str, render_id: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        cur = await conn.execute(
            "SELECT seq, type FROM generation.events WHERE render_id = %s ORDER BY seq", [render_id]
        )
        return await cur.fetchall()


async def test_a_renders_own_webhook_gets_a_delivery_per_event_it_asked_for(
    stub: Stub, start_worker: WorkerFactory, database_url: str
) -> None:
    await start_worker(procedural_step_ms=5.0, progress_interval_s=0.0)
    webhook = pb.WebhookSubscription(url=HOOK, events=["progress", "queued", "completed", "started"])
    render = await submit(stub, webhook=webhook, steps=8)

    done = await finished(stub, render.id)

    assert status_name(done) == "succeeded"
    assert (done.webhook.url, list(done.webhook.events)) == (
        HOOK,
        ["queued", "started", "progress", "completed"],
    )
    events = {row["type"]: row["seq"] for row in await _events(database_url, render.id)}
    deliveries = await _deliveries(database_url, render.id)
    assert [(d["event"], d["subscription"], d["state"]) for d in deliveries] == [
        ("queued", "render", "pending"),
        ("started", "render", "pending"),
        ("progress", "render", "pending"),  # eight progress events, one delivery: the newest
        ("completed", "render", "pending"),
    ]
    by_event = {d["event"]: d for d in deliveries}
    progress_seqs = [
        row["seq"] for row in await _events(database_url, render.id) if row["type"] == "progress"
    ]
    assert len(progress_seqs) >= 2 and by_event["progress"]["seq"] == max(progress_seqs)
    assert by_event["completed"]["seq"] == events["succeeded"]
    assert {d["url"] for d in deliveries} == {HOOK} and by_event["queued"]["trace_id"] == done.trace_id


async def test_a_render_without_a_webhook_sends_completed_only_by_default(
    stub: Stub, start_worker: WorkerFactory, database_url: str
) -> None:
    await start_worker()
    plain = await submit(stub)
    hooked = await submit(stub, webhook=pb.WebhookSubscription(url=HOOK))

    await finished(stub, plain.id)
    await finished(stub, hooked.id)

    assert await _deliveries(database_url, plain.id) == []
    assert [d["event"] for d in await _deliveries(database_url, hooked.id)] == ["completed"]


async def test_a_projects_endpoints_get_its_renders_events_and_no_one_elses(
    stub: Stub, start_worker: WorkerFactory, database_url: str
) -> None:
    accounts = accounts_of(stub)
    alice = await user_id(stub, "alice")
    await accounts.project("alice", "brand")
    with rpc_errors():
        endpoint = await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=HOOK, events=["completed"])
        )
        idle = await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=HOOK + "/idle")
        )
        await stub.UpdateWebhookEndpoint(
            pb.UpdateWebhookEndpointRequest(user_id=alice, project="art", endpoint_id=idle.id, enabled=False)
        )
    assert endpoint.secret.startswith("whsec_") and endpoint.state == "enabled"
    await start_worker()
    mine = await submit(stub)
    elsewhere = await submit(stub, project="brand")
    bobs = await submit(stub, "bob")

    for render in (mine, elsewhere):
        await finished(stub, render.id)
    await finished(stub, bobs.id, "bob")

    [delivery] = await _deliveries(database_url, mine.id)
    assert (str(delivery["endpoint_id"]), delivery["event"], delivery["url"]) == (
        endpoint.id,
        "completed",
        HOOK,
    )
    assert await _deliveries(database_url, elsewhere.id) == []
    assert await _deliveries(database_url, bobs.id) == []


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://127.0.0.1/hook", "not a loopback address"),
        ("http://2130706433/hook", "not a loopback address"),
        ("http://0x7f.1/hook", "not a loopback address"),
        ("http://[::ffff:127.0.0.1]/hook", "not a loopback address"),
        ("http://localhost/hook", "not a loopback address"),
        ("http://169.254.169.254/latest", "metadata"),
        ("http://10.0.0.7/hook", "private"),
        ("ftp://hooks.example.com/x", "http or https"),
        ("https://user:pw@hooks.example.com/x", "credentials"),
    ],
)
async def test_a_receiver_that_may_never_be_delivered_to_is_refused_when_named(
    stub: Stub, url: str, complaint: str
) -> None:
    alice = await user_id(stub, "alice")

    with pytest.raises(ValidationFailed) as on_render:
        await submit(stub, webhook=pb.WebhookSubscription(url=url))
    with pytest.raises(ValidationFailed) as on_endpoint, rpc_errors():
        await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=url)
        )

    assert on_render.value.errors[0].field == "webhook.url" and complaint in on_render.value.errors[0].message
    assert on_endpoint.value.errors[0].field == "url"


async def test_unknown_events_are_refused_and_another_users_endpoint_is_not_found(stub: Stub) -> None:
    alice, bob = await user_id(stub, "alice"), await user_id(stub, "bob")
    with pytest.raises(ValidationFailed) as refused:
        await submit(stub, webhook=pb.WebhookSubscription(url=HOOK, events=["finished"]))
    assert refused.value.errors[0].field == "webhook.events"
    with rpc_errors():
        endpoint = await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=HOOK)
        )

    for call in (
        stub.GetWebhookEndpoint(
            pb.WebhookEndpointRequest(user_id=bob, project="art", endpoint_id=endpoint.id)
        ),
        stub.DeleteWebhookEndpoint(
            pb.WebhookEndpointRequest(user_id=bob, project="art", endpoint_id=endpoint.id)
        ),
        stub.GetWebhookEndpoint(pb.WebhookEndpointRequest(user_id=alice, project="art", endpoint_id="nope")),
    ):
        with pytest.raises(NotFound), rpc_errors():
            await call


async def test_a_deleted_endpoints_deliveries_are_given_up_and_cannot_be_redelivered(
    stub: Stub, start_worker: WorkerFactory
) -> None:
    alice = await user_id(stub, "alice")
    with rpc_errors():
        endpoint = await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=HOOK)
        )
    await start_worker()
    render = await submit(stub)
    await finished(stub, render.id)
    request = pb.ListDeliveriesRequest(user_id=alice, render_id=render.id)

    with rpc_errors():
        await stub.DeleteWebhookEndpoint(
            pb.WebhookEndpointRequest(user_id=alice, project="art", endpoint_id=endpoint.id)
        )
        [delivery] = (await stub.ListDeliveries(request)).deliveries
    with pytest.raises(FailedPrecondition), rpc_errors():
        await stub.Redeliver(pb.RedeliverRequest(user_id=alice, delivery_id=delivery.id))

    assert (delivery.state, delivery.endpoint_id) == ("failed", endpoint.id)


async def test_a_users_first_deliveries_at_once_are_all_signed_with_one_new_secret(
    stub: Stub, database_url: str
) -> None:
    alice = await user_id(stub, "alice")  # the server has migrated the database
    pool = AsyncConnectionPool(
        search_path_url(database_url), kwargs={"autocommit": True}, min_size=10, max_size=10, open=False
    )
    await pool.open()
    try:
        store = WebhookStore(pool)
        deliveries = [replace(_delivery(alice), id=str(uuid.uuid4())) for _ in range(10)]

        secrets = await asyncio.gather(*(store.signing_secrets(d) for d in deliveries))

        assert all(len(found) == 1 for found in secrets)  # none found without one
        assert len({found[0] for found in secrets}) == 1  # one secret made, whoever made it
        assert (await store.user_secret(alice)).secret == secrets[0][0]
    finally:
        await pool.close()


def _delivery(user: str) -> Delivery:
    now = datetime.now(UTC)
    return Delivery(
        id="", user_id=user, render_id="r", endpoint_id="", url=HOOK, event="completed", seq=1,
        state="pending", attempts=1, created_at=now, next_attempt_at=now, delivered_at=None,
    )  # fmt: skip
