"""Batches: up to 64 renders submitted atomically, their counts and renders, their events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web
from renderflow.v1 import generation_pb2, metadata_pb2

from gateway.auth import Principal, principal
from gateway.batch_cursor import BatchCursor
from gateway.idempotency import find_repeat, idempotency_key, item_id, one_at_a_time, request_hash
from gateway.resources import batch_json, render_json
from gateway.routes import ID, clients, phase
from gateway.routes.events import resume_point, stream_events
from gateway.state import TRACEPARENT
from gateway.submission import render_spec, spent_so_far
from gateway.validation import read_json
from shared.errors import FieldError, NotFound, ValidationFailed

routes = web.RouteTableDef()

T = TypeVar("T")
Group = tuple[str, str]  # (project slug, chain id or "" for the project's default chain)


@routes.post("/v1/renders:batch")
async def submit_batch(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    with phase(request, "validation"):
        fields = await read_json(request, "BatchRequest")  # every item checked, failures named items[i].…
        items: list[dict[str, Any]] = fields["items"]
        key = idempotency_key(request)
        body_hash = request_hash(fields)
        groups: dict[Group, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item["project"], item.get("chain_id") or ""), []).append(index)
    async with one_at_a_time(request, user.user_id, key):
        with phase(request, "db"):
            base = str(uuid.uuid4())
            if key:
                base, repeat = await find_repeat(
                    services.generation, user.user_id, key, body_hash, lambda b: item_id(b, 0)
                )
                if repeat is not None:
                    batch = await services.generation.get_batch(user.user_id, repeat.batch_id)
                    return _accepted(batch, replayed=True)
            prepared = await _prepare(request, user, groups)
        specs: list[generation_pb2.RenderSpec] = [generation_pb2.RenderSpec()] * len(items)
        for indexes, answer in zip(groups.values(), prepared, strict=True):
            for offset, index in enumerate(indexes):
                position = answer.first_position + offset
                specs[index] = render_spec(item_id(base, index), items[index], answer, position)
        submitted = generation_pb2.SubmitBatchRequest(
            user_id=user.user_id,
            renders=specs,
            idempotency_key=key,
            request_hash=body_hash,
            traceparent=request[TRACEPARENT],
            timings=spent_so_far(request),
        )
        with phase(request, "enqueue"):
            batch = await services.generation.submit_batch(submitted)
    return _accepted(batch)


async def _prepare(
    request: web.Request, user: Principal, groups: dict[Group, list[int]]
) -> list[metadata_pb2.PrepareRenderResponse]:
    """One PrepareRender per (project, chain), all at once, each allocating its items' positions.
    With several groups, every project and chain is looked up first, so that one missing cannot
    leave the others with positions allocated for renders that never come (a gap that a later
    `previous` reference would wait on)."""
    metadata = clients(request).metadata
    if len(groups) > 1:
        await _settled(
            groups,
            [
                metadata.get_chain(user.user_id, project, chain)
                if chain
                else metadata.get_project(user.user_id, project)
                for project, chain in groups
            ],
        )
    return await _settled(
        groups,
        [
            metadata.prepare_render(user.user_id, project, chain or None, len(indexes))
            for (project, chain), indexes in groups.items()
        ],
    )


async def _settled(groups: dict[Group, list[int]], calls: list[Awaitable[T]]) -> list[T]:
    """The answers of one call per group; a project or chain that does not exist is the fault of
    the first item naming it (422 naming every such item)."""
    answers = await asyncio.gather(*calls, return_exceptions=True)
    errors: list[FieldError] = []
    results: list[T] = []
    for ((_, chain), indexes), answer in zip(groups.items(), answers, strict=True):
        if isinstance(answer, NotFound):
            field = "chain_id" if chain and "chain" in answer.message else "project"
            errors.append(FieldError(f"items[{indexes[0]}].{field}", answer.message))
        elif isinstance(answer, BaseException):
            raise answer
        else:
            results.append(answer)
    if errors:
        raise ValidationFailed(f"{errors[0].field}: {errors[0].message}", errors)
    return results


def _accepted(batch: generation_pb2.Batch, replayed: bool = False) -> web.Response:
    headers = {"Location": f"/v1/batches/{batch.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    answer = {"batch_id": batch.id, "renders": [render_json(r) for r in batch.renders]}
    return web.json_response(answer, status=202, headers=headers)


@routes.get(f"/v1/batches/{ID}")
async def get_batch(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        batch = await clients(request).generation.get_batch(user.user_id, request.match_info["id"])
    return web.json_response(batch_json(batch))


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
