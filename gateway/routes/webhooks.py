"""Webhooks: the signing secret of the webhooks renders name, a project's standing endpoints, and
the delivery log (a render's, an endpoint's) with redelivery. Generation checks every URL (a public
address, unless allow-listed) and keeps everything; another user's endpoint or delivery is a 404."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import principal
from gateway.resources import (
    delivery_json,
    json_response,
    page,
    webhook_endpoint_json,
    webhook_secret_json,
)
from gateway.routes import ID, body, clients, page_args, phase, query

routes = web.RouteTableDef()

_NO_STORE = {"Cache-Control": "no-store"}
"""On every answer that carries a secret."""


async def _overlap_s(request: web.Request) -> float:
    """A rotation's `overlap_s` (0: the service's default); the body is optional."""
    if not request.body_exists:
        return 0.0
    fields = await body(request, "RotateWebhookSecretRequest")
    return float(fields.get("overlap_s", 0.0))


@routes.get("/v1/webhooks/secret")
async def get_webhook_secret(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        secret = await clients(request).generation.get_webhook_secret(user.user_id)
    return json_response(webhook_secret_json(secret), headers=_NO_STORE)


@routes.post("/v1/webhooks/secret:rotate")
async def rotate_webhook_secret(request: web.Request) -> web.Response:
    user = principal(request)
    overlap_s = await _overlap_s(request)
    with phase(request, "db"):
        secret = await clients(request).generation.rotate_webhook_secret(user.user_id, overlap_s)
    return json_response(webhook_secret_json(secret), headers=_NO_STORE)


@routes.post("/v1/projects/{slug}/webhooks")
async def create_webhook_endpoint(request: web.Request) -> web.Response:
    user = principal(request)
    slug = request.match_info["slug"]
    fields = await body(request, "CreateWebhookEndpointRequest")
    with phase(request, "db"):
        endpoint = await clients(request).generation.create_webhook_endpoint(
            user.user_id, slug, fields["url"], fields.get("events", []), fields.get("description", "")
        )
    headers = {"Location": f"/v1/projects/{slug}/webhooks/{endpoint.id}", **_NO_STORE}
    return json_response(webhook_endpoint_json(endpoint), status=201, headers=headers)


@routes.get("/v1/projects/{slug}/webhooks")
async def list_webhook_endpoints(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        endpoints = await clients(request).generation.list_webhook_endpoints(
            user.user_id, request.match_info["slug"]
        )
    return json_response({"webhooks": [webhook_endpoint_json(e) for e in endpoints]})


@routes.get(f"/v1/projects/{{slug}}/webhooks/{ID}")
async def get_webhook_endpoint(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        endpoint = await clients(request).generation.get_webhook_endpoint(
            user.user_id, request.match_info["slug"], request.match_info["id"]
        )
    return json_response(webhook_endpoint_json(endpoint))


@routes.patch(f"/v1/projects/{{slug}}/webhooks/{ID}")
async def update_webhook_endpoint(request: web.Request) -> web.Response:
    user = principal(request)
    fields = await body(request, "UpdateWebhookEndpointRequest")
    with phase(request, "db"):
        endpoint = await clients(request).generation.update_webhook_endpoint(
            user.user_id,
            request.match_info["slug"],
            request.match_info["id"],
            url=fields.get("url"),
            events=fields.get("events"),
            description=fields.get("description"),
            enabled=fields.get("enabled"),
        )
    return json_response(webhook_endpoint_json(endpoint))


@routes.delete(f"/v1/projects/{{slug}}/webhooks/{ID}")
async def delete_webhook_endpoint(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        await clients(request).generation.delete_webhook_endpoint(
            user.user_id, request.match_info["slug"], request.match_info["id"]
        )
    return web.Response(status=204)


@routes.post(f"/v1/projects/{{slug}}/webhooks/{ID}:rotate-secret")
async def rotate_webhook_endpoint_secret(request: web.Request) -> web.Response:
    user = principal(request)
    overlap_s = await _overlap_s(request)
    with phase(request, "db"):
        secret = await clients(request).generation.rotate_webhook_secret(
            user.user_id,
            overlap_s,
            project=request.match_info["slug"],
            endpoint_id=request.match_info["id"],
        )
    return json_response(webhook_secret_json(secret), headers=_NO_STORE)


@routes.get(f"/v1/projects/{{slug}}/webhooks/{ID}/deliveries")
async def list_endpoint_deliveries(request: web.Request) -> web.Response:
    user = principal(request)
    page_size, page_token = page_args(query(request, "listEndpointDeliveries"))
    with phase(request, "db"):
        answer = await clients(request).generation.list_deliveries(
            user.user_id,
            project=request.match_info["slug"],
            endpoint_id=request.match_info["id"],
            page_size=page_size,
            page_token=page_token,
        )
    deliveries = [delivery_json(d) for d in answer.deliveries]
    return json_response(page("deliveries", deliveries, answer.next_page_token))


@routes.get(f"/v1/renders/{ID}/deliveries")
async def list_render_deliveries(request: web.Request) -> web.Response:
    user = principal(request)
    page_size, page_token = page_args(query(request, "listRenderDeliveries"))
    with phase(request, "db"):
        answer = await clients(request).generation.list_deliveries(
            user.user_id, render_id=request.match_info["id"], page_size=page_size, page_token=page_token
        )
    deliveries = [delivery_json(d) for d in answer.deliveries]
    return json_response(page("deliveries", deliveries, answer.next_page_token))


@routes.post(f"/v1/deliveries/{ID}:redeliver")
async def redeliver(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        delivery = await clients(request).generation.redeliver(user.user_id, request.match_info["id"])
    return json_response(delivery_json(delivery), status=202)
