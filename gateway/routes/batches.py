"""Batches: up to 64 renders submitted atomically, their counts and renders, their events."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.auth import principal
from gateway.batch_cursor import BatchCursor
from gateway.idempotency import idempotency_key, request_hash
from gateway.resources import batch_json, json_response
from gateway.routes import ID, clients, phase
from gateway.routes.events import resume_point, stream_events
from gateway.state import TRACEPARENT
from gateway.submission import deadline, render_spec, spent_so_far
from gateway.validation import read_json
from shared.render_json import render_json

routes = web.RouteTableDef()


@routes.post("/v1/renders:batch")
async def submit_batch(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    with phase(request, "validation"):
        fields = await read_json(request, "BatchRequest")  # every item checked, failures named items[i].…
        items: list[dict[str, Any]] = fields["items"]
        # What the batch states for all its items, unless an item states its own.
        shared: dict[str, Any] = {
            name: fields[name]
            for name in ("deadline", "timeout_s", "retention_s", "webhook")
            if name in fields
        }
        if "deadline" in shared:  # one moment for every item, read now
            shared["deadline"] = deadline(shared["deadline"], "deadline").isoformat()
        key, body_hash = idempotency_key(request), request_hash(fields)
    # Generation resolves each item's project and chain (an unknown one: 422 naming its item).
    submitted = generation_pb2.SubmitBatchRequest(
        user_id=user.user_id,
        renders=[
            render_spec(
                {**shared, **item}, item["project"], item.get("chain_id"), field_prefix=f"items[{index}]."
            )
            for index, item in enumerate(items)
        ],
        idempotency_key=key,
        request_hash=body_hash,
        traceparent=request[TRACEPARENT],
        timings=spent_so_far(request),
        min_change_seq=services.metadata.acknowledged(user.user_id),
    )
    with phase(request, "enqueue"):
        batch, replayed = await services.generation.submit_batch(submitted)
    return _accepted(batch, replayed=replayed)


def _accepted(batch: generation_pb2.Batch, replayed: bool = False) -> web.Response:
    headers = {"Location": f"/v1/batches/{batch.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    answer = {"id": batch.id, "batch_id": batch.id, "renders": [render_json(r) for r in batch.renders]}
    return json_response(answer, status=202, headers=headers)


@routes.post(f"/v1/batches/{ID}:cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        batch, nothing_left = await clients(request).generation.cancel_batch(
            user.user_id, request.match_info["id"]
        )
    # 200: every render of the batch had ended before this request, which changed nothing.
    return json_response(batch_json(batch), status=200 if nothing_left else 202)


@routes.get(f"/v1/batches/{ID}")
async def get_batch(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        batch = await clients(request).generation.get_batch(user.user_id, request.match_info["id"])
    return json_response(batch_json(batch))


@routes.get(f"/v1/batches/{ID}/events", allow_head=False)
async def batch_events(request: web.Request) -> web.StreamResponse:
    user = principal(request)
    batch_id = request.match_info["id"]
    generation = clients(request).generation
    text, field = resume_point(request, "watchBatch")
    with phase(request, "db"):
        batch = await generation.get_batch(user.user_id, batch_id)  # unknown or not yours: 404 first
    cursor = BatchCursor.parse(text, [render.id for render in batch.renders], field)
    events = generation.watch_batch(user.user_id, batch_id, cursor.seqs)
    return await stream_events(request, events, ids=cursor.advance)
