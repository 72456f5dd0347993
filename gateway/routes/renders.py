"""Renders: submit (the fast path, idempotent, optionally waiting), a chain's next render, get,
list, a chain's renders in order, cancel; and the old system's paths as aliases of the submits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.auth import Principal, authenticated, principal
from gateway.idempotency import idempotency_key, request_hash
from gateway.resources import json_response, page
from gateway.routes import ID, clients, page_args, phase, query
from gateway.state import SETTINGS, TIMER, TRACEPARENT
from gateway.submission import moment, prefer_wait, render_spec, spent_so_far
from gateway.validation import read_json
from gateway.watch_hub import WATCH_HUB
from shared.render_json import KINDS, STATUSES, TERMINAL_STATUSES, render_json

routes = web.RouteTableDef()


@routes.post("/v1/renders")
@routes.post("/render")  # the old system's path: clients switch by changing the host
async def submit_render(request: web.Request) -> web.Response:
    user = await authenticated(request)  # the alias is outside /v1/, where the middleware does it
    with phase(request, "validation"):
        fields = await read_json(request, "RenderRequest")
        intent = _intent(request, fingerprint=fields)
    return await _submit(request, user, fields, fields["project"], fields.get("chain_id"), intent)


@routes.post("/v1/projects/{slug}/chains/{chain_id}/renders")
@routes.post("/project/{slug}/chain/{chain_id}")  # the old system's chain action
async def submit_chain_render(request: web.Request) -> web.Response:
    user = await authenticated(request)
    slug, chain_id = request.match_info["slug"], request.match_info["chain_id"]
    with phase(request, "validation"):
        fields = await read_json(request, "ChainRenderRequest")
        # Unless it names another, the render's reference is its predecessor's output.
        fields.setdefault("reference", {"previous": True})
        intent = _intent(request, fingerprint={"chain": [slug, chain_id], **fields})
    return await _submit(request, user, fields, slug, chain_id, intent)


@dataclass(frozen=True)
class _Intent:
    """What the headers of a submission ask for, and the fingerprint of its body."""

    idempotency_key: str
    wait_s: float | None
    body_hash: str


def _intent(request: web.Request, fingerprint: dict[str, Any]) -> _Intent:
    return _Intent(
        idempotency_key(request),
        prefer_wait(request, request.app[SETTINGS].max_wait_s),
        request_hash(fingerprint),
    )


async def _submit(
    request: web.Request,
    user: Principal,
    fields: dict[str, Any],
    project: str,
    chain_id: str | None,
    intent: _Intent,
) -> web.Response:
    services = clients(request)
    attributes = {"render.project": project, "render.kind": fields["kind"], "render.tenant": user.user_id}
    request[TIMER].annotate(attributes)
    # One call: generation resolves the project, chain and rules, allocates the position and
    # queues the render, idempotently on the key.
    submitted = generation_pb2.SubmitRequest(
        user_id=user.user_id,
        render=render_spec(fields, project, chain_id),
        idempotency_key=intent.idempotency_key,
        request_hash=intent.body_hash,
        traceparent=request[TRACEPARENT],
        timings=spent_so_far(request),
        min_change_seq=services.metadata.acknowledged(user.user_id),
    )
    with phase(request, "enqueue"):
        render, replayed = await services.generation.submit(submitted)
    return await _answer(request, user, render, intent.wait_s, replayed=replayed)


async def _answer(
    request: web.Request,
    user: Principal,
    render: generation_pb2.Render,
    wait_s: float | None,
    replayed: bool = False,
) -> web.Response:
    request[TIMER].annotate({"render.id": render.id})
    headers = {"Location": f"/v1/renders/{render.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    if wait_s is not None:
        headers["Preference-Applied"] = f"wait={wait_s:g}"
        if render.status not in TERMINAL_STATUSES and wait_s > 0:
            with phase(request, "wait"):
                if await request.app[WATCH_HUB].wait_for_end(user.user_id, render.id, wait_s):
                    render = await clients(request).generation.get_render(user.user_id, render.id)
    status = 200 if wait_s is not None and render.status in TERMINAL_STATUSES else 202
    return json_response(render_json(render), status=status, headers=headers)


@routes.get(f"/v1/renders/{ID}")
async def get_render(request: web.Request) -> web.Response:
    user = principal(request)
    download_url = query(request, "getRender").get("download_url", False)
    with phase(request, "db"):
        render = await clients(request).generation.get_render(
            user.user_id, request.match_info["id"], download_url=download_url
        )
    return json_response(render_json(render))


@routes.get("/v1/renders")
async def list_renders(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    params = query(request, "listRenders")
    page_size, page_token = page_args(params)
    with phase(request, "db"):
        project_id = ""
        if "project" in params:
            project_id = (await services.metadata.get_project(user.user_id, params["project"])).id
        answer = await services.generation.list_renders(
            user.user_id,
            project_id=project_id,
            chain_id=params.get("chain_id", ""),
            status=STATUSES.get(params.get("status", ""), generation_pb2.RENDER_STATUS_UNSPECIFIED),
            kind=KINDS.get(params.get("kind", ""), generation_pb2.RENDER_KIND_UNSPECIFIED),
            batch_id=params.get("batch_id", ""),
            created_after=_moment(params, "created_after"),
            created_before=_moment(params, "created_before"),
            page_size=page_size,
            page_token=page_token,
            download_url=params.get("download_url", False),
        )
    return json_response(page("renders", [render_json(r) for r in answer.renders], answer.next_page_token))


def _moment(params: dict[str, Any], name: str) -> datetime | None:
    """A date-time query parameter, when given."""
    return moment(params[name], name) if name in params else None


@routes.get("/v1/projects/{slug}/chains/{chain_id}/renders")
async def list_chain_renders(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    page_size, page_token = page_args(query(request, "listChainRenders"))
    with phase(request, "db"):
        chain = await services.metadata.get_chain(
            user.user_id, request.match_info["slug"], request.match_info["chain_id"]
        )
        answer = await services.generation.list_renders(
            user.user_id,
            project_id=chain.project_id,
            chain_id=chain.id,
            page_size=page_size,
            page_token=page_token,
            by_position=True,
        )
    return json_response(page("renders", [render_json(r) for r in answer.renders], answer.next_page_token))


@routes.post(f"/v1/renders/{ID}:cancel")
async def cancel_render(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        render, already = await clients(request).generation.cancel(user.user_id, request.match_info["id"])
    # 200: it was cancelled (or expired) before this request, which changed nothing.
    return json_response(render_json(render), status=200 if already else 202)


@routes.post(f"/v1/renders/{ID}:retry")
async def retry_render(request: web.Request) -> web.Response:
    user = principal(request)
    render_id = request.match_info["id"]
    with phase(request, "validation"):
        intent = _intent(request, fingerprint={"retry": render_id})
    retried = generation_pb2.RetryRequest(
        user_id=user.user_id,
        render_id=render_id,
        idempotency_key=intent.idempotency_key,
        request_hash=intent.body_hash,
        traceparent=request[TRACEPARENT],
        timings=spent_so_far(request),
        min_change_seq=clients(request).metadata.acknowledged(user.user_id),
    )
    with phase(request, "enqueue"):
        render, replayed = await clients(request).generation.retry(retried)
    return await _answer(request, user, render, intent.wait_s, replayed=replayed)


@routes.delete(f"/v1/renders/{ID}")
async def delete_render_output(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        render = await clients(request).generation.delete_output(user.user_id, request.match_info["id"])
    return json_response(render_json(render))


@routes.patch(f"/v1/renders/{ID}")
async def update_render(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "validation"):
        fields = await read_json(request, "UpdateRenderRequest")
    update = generation_pb2.UpdateRenderRequest(
        user_id=user.user_id, render_id=request.match_info["id"], priority=int(fields["priority"])
    )
    with phase(request, "db"):
        render = await clients(request).generation.update_render(update)
    return json_response(render_json(render))
