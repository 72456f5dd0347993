"""Webhook deliveries end to end: a generation server whose dispatcher sends through a real image
fetcher (loopback allow-listed) to a real receiver on 127.0.0.1. Signatures are checked with the
`standardwebhooks` package, not with Renderflow's own code."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from renderflow.v1 import generation_pb2 as pb
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.generation.webhooks.settings import WebhookSettings
from services.imagefetch.config import Settings as ImageFetchSettings
from services.imagefetch.server import running as imagefetch_running
from shared.rpc_errors import rpc_errors
from shared.url_guard import parse_allow_list
from tests.support.gateway_stack import eventually
from tests.support.generation import (
    ServerFactory,
    Stub,
    WorkerFactory,
    finished,
    submit,
    user_id,
)
from tests.support.observed_stack import Recorder
from tests.support.webhook_receiver import Receiver

LOOPBACK = parse_allow_list(["127.0.0.1"])
FAST = WebhookSettings(
    poll_s=0.02, timeout_s=2.0, backoff_s=0.05, backoff_max_s=0.2, retry_for_s=30.0, allow=LOOPBACK
)


@pytest.fixture
async def imagefetch_addr() -> AsyncIterator[str]:
    settings = ImageFetchSettings(listen="127.0.0.1:0", allow=LOOPBACK, backoff_initial_s=0.01)
    async with imagefetch_running(settings) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


async def _server(start_server: ServerFactory, imagefetch_addr: str, **changes: Any) -> Stub:
    return await start_server(imagefetch_addr=imagefetch_addr, webhooks=replace(FAST, **changes))


async def _secret(stub: Stub, user: str = "alice") -> str:
    with rpc_errors():
        answer = await stub.GetWebhookSecret(pb.GetWebhookSecretRequest(user_id=await user_id(stub, user)))
    return str(answer.secret)


async def _deliveries(stub: Stub, render_id: str, user: str = "alice") -> list[pb.Delivery]:
    request = pb.ListDeliveriesRequest(user_id=await user_id(stub, user), render_id=render_id)
    with rpc_errors():
        return list((await stub.ListDeliveries(request)).deliveries)


async def test_a_completed_render_is_delivered_signed_with_the_render_as_get_shows_it(
    start_server: ServerFactory,
    start_worker: WorkerFactory,
    imagefetch_addr: str,
    receiver: Receiver,
    recorder: Recorder,
) -> None:
    stub = await _server(start_server, imagefetch_addr)
    await start_worker()
    secret = await _secret(stub)
    trace_id = "5b8efff798038103d269b633813fc60c"
    render = await submit(
        stub,
        webhook=pb.WebhookSubscription(url=receiver.url),
        traceparent=f"00-{trace_id}-eee19b7ec3c1b174-01",
    )
    done = await finished(stub, render.id)

    await receiver.wait_for(lambda: len(receiver.received) == 1)

    [request] = receiver.received
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["type"] == "render.completed" and payload["data"]["id"] == render.id
    assert payload["data"]["status"] == "succeeded"
    happened = datetime.fromisoformat(payload["timestamp"]) - done.finished_at.ToDatetime(UTC)
    assert abs(happened.total_seconds()) < 0.1  # when the render ended, not when it was sent
    assert payload["data"]["output"]["url"] == f"/v1/renders/{render.id}/output"  # a link, never the bytes
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(request.body, request.headers)
    [delivery] = await _settled(stub, render.id)
    assert request.headers["webhook-id"] == delivery.id and delivery.state == "delivered"
    assert [(a.number, a.outcome, a.status) for a in delivery.attempt_log] == [(1, "delivered", 200)]
    # The attempt's span leads back to the render's trace, and says how it went.
    await recorder.wait_for(lambda spans: any(_attempt_spans(spans, delivery.id)))
    [span] = _attempt_spans(recorder.spans, delivery.id)
    assert [format(link.context.trace_id, "032x") for link in span.links] == [trace_id]
    assert (span.attributes or {}).get("webhook.outcome") == "delivered"


def _attempt_spans(spans: list[ReadableSpan], delivery_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.name == "webhook delivery" and (s.attributes or {}).get("webhook.delivery_id") == delivery_id
    ]


async def test_a_receiver_that_fails_gets_the_same_webhook_id_until_it_answers_2xx_and_no_more(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    receiver.answers = [503, 500, 429]
    receiver.retry_after = "0"
    stub = await _server(start_server, imagefetch_addr)
    await start_worker()
    secret = await _secret(stub)
    render = await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url))
    await finished(stub, render.id)

    await receiver.wait_for(lambda: len(receiver.received) == 4)
    await _settled(stub, render.id)

    ids = {request.headers["webhook-id"] for request in receiver.received}
    bodies = {request.body for request in receiver.received}
    assert len(ids) == 1 and len(bodies) == 1  # the same event, the same bytes, each attempt signed anew
    for request in receiver.received:
        Webhook(secret).verify(request.body, request.headers)
    [delivery] = await _deliveries(stub, render.id)
    assert (delivery.state, delivery.attempts) == ("delivered", 4)
    assert [a.outcome for a in delivery.attempt_log] == ["http_503", "http_500", "http_429", "delivered"]
    assert [a.status for a in delivery.attempt_log] == [503, 500, 429, 200]
    assert delivery.attempt_log[0].response_excerpt == "answered 503"
    assert len(receiver.received) == 4  # delivered: not sent again


async def test_a_receiver_that_is_down_gets_every_event_once_it_is_back(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    await receiver.down()
    stub = await _server(start_server, imagefetch_addr)
    await start_worker()
    renders = [await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url)) for _ in range(10)]
    for render in renders:
        await finished(stub, render.id)
    await _attempted(stub, renders[0].id, at_least=2)  # connection refused, and retried

    await receiver.up()
    await receiver.wait_for(lambda: len({r.headers["webhook-id"] for r in receiver.received}) == 10)

    delivered = {json.loads(request.body)["data"]["id"] for request in receiver.received}
    assert delivered == {render.id for render in renders}
    [first] = await _deliveries(stub, renders[0].id)
    assert first.attempt_log[0].outcome == "connection_failed" and first.attempt_log[0].status == 0


async def test_a_redirect_is_not_followed_and_says_so(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    async with Receiver() as target:
        receiver.redirect_to = target.url
        stub = await _server(start_server, imagefetch_addr, retry_for_s=0.0)  # one attempt only
        await start_worker()
        render = await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url))
        await finished(stub, render.id)

        [delivery] = await _settled(stub, render.id)

    assert delivery.state == "failed"
    assert [(a.outcome, a.status) for a in delivery.attempt_log] == [("redirect_not_followed", 307)]
    assert target.received == []


async def test_events_of_a_render_arrive_in_order_and_redeliver_sends_one_again(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    stub = await _server(start_server, imagefetch_addr)
    await start_worker(procedural_step_ms=2.0)
    events = ["queued", "started", "progress", "completed"]
    render = await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url, events=events))
    await finished(stub, render.id)
    await _settled(stub, render.id)

    kinds = [json.loads(request.body)["type"] for request in receiver.received]
    assert kinds[0] == "render.queued" and kinds[1] == "render.started" and kinds[-1] == "render.completed"
    assert set(kinds[2:-1]) <= {"render.progress"}
    completed = next(d for d in await _deliveries(stub, render.id) if d.event == "completed")
    with rpc_errors():
        again = await stub.Redeliver(
            pb.RedeliverRequest(user_id=await user_id(stub), delivery_id=completed.id)
        )
    assert again.state == "pending"
    await receiver.wait_for(lambda: len(receiver.received) == len(kinds) + 1)
    assert receiver.received[-1].headers["webhook-id"] == completed.id
    assert receiver.received[-1].body == next(
        r.body for r in receiver.received if r.headers["webhook-id"] == completed.id
    )


async def test_during_a_rotation_both_secrets_sign(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    stub = await _server(start_server, imagefetch_addr)
    await start_worker()
    old = await _secret(stub)
    with rpc_errors():
        rotated = await stub.RotateWebhookSecret(pb.RotateWebhookSecretRequest(user_id=await user_id(stub)))
    render = await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url))
    await finished(stub, render.id)
    await receiver.wait_for(lambda: len(receiver.received) == 1)

    [request] = receiver.received
    assert rotated.secret != old and rotated.HasField("previous_expires_at")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(request.body, request.headers)
    Webhook(rotated.secret).verify(request.body, request.headers)


async def test_an_endpoint_failing_for_long_enough_is_disabled(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    receiver.default = 500
    stub = await _server(start_server, imagefetch_addr, disable_after_s=0.3)
    alice = await user_id(stub)
    with rpc_errors():
        endpoint = await stub.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(user_id=alice, project="art", url=receiver.url)
        )
    await start_worker()
    render = await submit(stub)
    await finished(stub, render.id)
    request = pb.WebhookEndpointRequest(user_id=alice, project="art", endpoint_id=endpoint.id)

    async def disabled() -> bool:
        with rpc_errors():
            return (await stub.GetWebhookEndpoint(request)).state == "disabled"

    await eventually(disabled, timeout_s=15)
    with rpc_errors():
        current = await stub.GetWebhookEndpoint(request)
    attempts = len(receiver.received)

    assert "failed without a break" in current.disabled_reason and current.HasField("failing_since")
    [delivery] = await _deliveries(stub, render.id)
    assert delivery.state == "pending"  # kept, not sent while the endpoint is disabled
    with rpc_errors():
        await stub.UpdateWebhookEndpoint(
            pb.UpdateWebhookEndpointRequest(
                user_id=alice, project="art", endpoint_id=endpoint.id, enabled=True
            )
        )
    receiver.default = 200
    await receiver.wait_for(lambda: len(receiver.received) > attempts)
    [delivery] = await _settled(stub, render.id)
    assert delivery.state == "delivered"


async def _attempted(stub: Stub, render_id: str, at_least: int) -> None:
    """Waits until the render's first delivery has had `at_least` attempts (bounded)."""

    async def enough() -> bool:
        found = await _deliveries(stub, render_id)
        return bool(found) and found[0].attempts >= at_least

    await eventually(enough, timeout_s=15)


async def _settled(stub: Stub, render_id: str) -> list[pb.Delivery]:
    """The render's deliveries once none is pending (bounded)."""

    async def settled() -> bool:
        found = await _deliveries(stub, render_id)
        return bool(found) and all(d.state != "pending" for d in found)

    await eventually(settled, timeout_s=15)
    return await _deliveries(stub, render_id)


async def test_a_receiver_that_hangs_holds_back_no_one_else(
    start_server: ServerFactory, start_worker: WorkerFactory, imagefetch_addr: str, receiver: Receiver
) -> None:
    receiver.answers = ["hang"] * 100  # every request hangs until released
    stub = await _server(start_server, imagefetch_addr, concurrency=4, per_receiver=2, timeout_s=10.0)
    await start_worker()
    async with Receiver() as other:
        hanging = [await submit(stub, webhook=pb.WebhookSubscription(url=receiver.url)) for _ in range(8)]
        for render in hanging:
            await finished(stub, render.id)
        await receiver.wait_for(lambda: len(receiver.received) == 2)  # no more than its share at once
        prompt = await submit(stub, webhook=pb.WebhookSubscription(url=other.url))
        await finished(stub, prompt.id)

        await other.wait_for(lambda: len(other.received) == 1)

        assert len(receiver.received) == 2  # still hanging, still only its share
        receiver.release()
