"""Webhooks under faults, the stack as real processes: a receiver that is down while 100 renders
end, the generation service (whose dispatcher sends) killed with -9 while their deliveries retry and
again while they are sent, the image fetcher (through which they leave) killed too. Once the
receiver is back, every render's `completed` event arrives, validly signed, and a duplicate is only
ever the same `webhook-id` again."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from tests.chaos.scenario import create_project, drain
from tests.chaos.stack import Stack, StackConfig, running_stack
from tests.support.gateway_stack import eventually
from tests.support.webhook_receiver import Received, Receiver

RENDERS = 100
FAST_RETRIES = {
    "RENDERFLOW_WEBHOOKS_POLL_S": "0.05",
    "RENDERFLOW_WEBHOOKS_BACKOFF_S": "0.2",
    "RENDERFLOW_WEBHOOKS_BACKOFF_MAX_S": "1",
    "RENDERFLOW_WEBHOOKS_TIMEOUT_S": "2",  # the lease of an attempt: 2 x 2 + 5 s
    # One key submits them all, in two batches.
    "RENDERFLOW_GATEWAY_RATE_LIMIT_PER_S": "0",
    "RENDERFLOW_GENERATION_MAX_ACTIVE_RENDERS": "0",
}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_no_completed_event_is_lost_to_a_receiver_outage_or_kill_9(tmp_path: Path) -> None:
    config = StackConfig(workers=1, worker_concurrency=8, step_ms=2.0, extra_env=FAST_RETRIES)
    async with Receiver() as receiver, running_stack(tmp_path, config) as stack:
        await receiver.down()
        await create_project(stack)
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        async with aiohttp.ClientSession(stack.url, headers=headers) as http:
            async with http.get("/v1/webhooks/secret") as answer:
                secret = (await answer.json())["secret"]
            ids: list[str] = []
            for _ in range(RENDERS // 50):
                hook = {"url": receiver.url}
                items = [
                    {"project": "chaos", "kind": "image", "prompt": f"fox {n}", "webhook": hook}
                    for n in range(50)
                ]
                body = {"items": items}
                async with http.post("/v1/renders:batch", json=body) as answer:
                    assert answer.status == 202, await answer.text()
                    ids += [render["id"] for render in (await answer.json())["renders"]]
        await drain(stack, ids, limit_s=60)
        await _attempted(stack, RENDERS)  # every delivery failed at least once: the receiver is down

        old = stack.kill("generation")  # while they wait to be tried again
        await stack.wait_serving("generation", old)
        old = stack.kill("imagefetch")
        await stack.wait_serving("imagefetch", old)
        await receiver.up()
        await receiver.wait_for(lambda: len(receiver.received) >= RENDERS // 4, timeout_s=60)
        old = stack.kill("generation")  # while they are being sent
        await stack.wait_serving("generation", old)
        await receiver.wait_for(lambda: len(_by_id(receiver)) == RENDERS, timeout_s=90)

    delivered = _by_id(receiver)
    render_of = {}
    for webhook_id, requests in delivered.items():
        bodies = {request.body for request in requests}
        assert len(bodies) == 1, f"{webhook_id} was sent with different bodies"
        for request in requests:
            Webhook(secret).verify(request.body, request.headers)
        payload = json.loads(requests[0].body)
        assert payload["type"] == "render.completed"
        render_of[webhook_id] = payload["data"]["id"]
    assert sorted(render_of.values()) == sorted(ids)  # every render, each under one webhook-id


def _by_id(receiver: Receiver) -> dict[str, list[Received]]:
    grouped: dict[str, list[Received]] = defaultdict(list)
    for request in receiver.received:
        grouped[request.headers["webhook-id"]].append(request)
    return grouped


async def _attempted(stack: Stack, count: int) -> None:
    """Waits (bounded) until `count` deliveries have each been attempted."""

    async def enough() -> bool:
        rows = await stack.query(
            "SELECT count(*) FROM generation.webhook_deliveries WHERE attempts >= 1 AND state = 'pending'"
        )
        return bool(rows[0][0] >= count)

    await eventually(enough, timeout_s=60)
