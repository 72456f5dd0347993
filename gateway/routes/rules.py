"""A project's rules: project-wide or for one chain; renders snapshot the active ones."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import principal
from gateway.resources import json_response, page, rule_json
from gateway.routes import body, clients, page_args, phase, query

routes = web.RouteTableDef()


@routes.post("/v1/projects/{slug}/rules")
async def create_rule(request: web.Request) -> web.Response:
    user = principal(request)
    slug = request.match_info["slug"]
    fields = await body(request, "CreateRuleRequest")
    with phase(request, "db"):
        rule = await clients(request).metadata.create_rule(
            user.user_id, slug, fields["text"], fields.get("chain_id"), fields.get("active")
        )
    return json_response(
        rule_json(rule), status=201, headers={"Location": f"/v1/projects/{slug}/rules/{rule.id}"}
    )


@routes.get("/v1/projects/{slug}/rules")
async def list_rules(request: web.Request) -> web.Response:
    user = principal(request)
    page_size, page_token = page_args(query(request, "listRules"))
    with phase(request, "db"):
        answer = await clients(request).metadata.list_rules(
            user.user_id, request.match_info["slug"], page_size, page_token
        )
    return json_response(page("rules", [rule_json(r) for r in answer.rules], answer.next_page_token))


@routes.patch("/v1/projects/{slug}/rules/{rule_id}")
async def update_rule(request: web.Request) -> web.Response:
    user = principal(request)
    fields = await body(request, "UpdateRuleRequest")
    with phase(request, "db"):
        rule = await clients(request).metadata.update_rule(
            user.user_id,
            request.match_info["slug"],
            request.match_info["rule_id"],
            fields.get("text"),
            fields.get("active"),
        )
    return json_response(rule_json(rule))


@routes.delete("/v1/projects/{slug}/rules/{rule_id}")
async def delete_rule(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        await clients(request).metadata.delete_rule(
            user.user_id, request.match_info["slug"], request.match_info["rule_id"]
        )
    return web.Response(status=204)
