"""Projects and their chains."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import principal
from gateway.resources import chain_json, json_response, page, project_json
from gateway.routes import body, clients, page_args, phase, query

routes = web.RouteTableDef()


@routes.post("/v1/projects")
async def create_project(request: web.Request) -> web.Response:
    user = principal(request)
    fields = await body(request, "CreateProjectRequest")
    with phase(request, "db"):
        project = await clients(request).metadata.create_project(user.user_id, fields["slug"], fields["name"])
    return json_response(
        project_json(project), status=201, headers={"Location": f"/v1/projects/{project.slug}"}
    )


@routes.get("/v1/projects")
async def list_projects(request: web.Request) -> web.Response:
    user = principal(request)
    page_size, page_token = page_args(query(request, "listProjects"))
    with phase(request, "db"):
        answer = await clients(request).metadata.list_projects(user.user_id, page_size, page_token)
    return json_response(page("projects", [project_json(p) for p in answer.projects], answer.next_page_token))


@routes.get("/v1/projects/{slug}")
async def get_project(request: web.Request) -> web.Response:
    user = principal(request)
    with phase(request, "db"):
        project = await clients(request).metadata.get_project(user.user_id, request.match_info["slug"])
    return json_response(project_json(project))


@routes.post("/v1/projects/{slug}/chains")
async def create_chain(request: web.Request) -> web.Response:
    user = principal(request)
    slug = request.match_info["slug"]
    fields = await body(request, "CreateChainRequest")
    with phase(request, "db"):
        chain = await clients(request).metadata.create_chain(user.user_id, slug, fields["name"])
    return json_response(
        chain_json(chain, 0), status=201, headers={"Location": f"/v1/projects/{slug}/chains/{chain.id}"}
    )


@routes.get("/v1/projects/{slug}/chains")
async def list_chains(request: web.Request) -> web.Response:
    user = principal(request)
    page_size, page_token = page_args(query(request, "listChains"))
    services = clients(request)
    with phase(request, "db"):
        answer = await services.metadata.list_chains(
            user.user_id, request.match_info["slug"], page_size, page_token
        )
        lengths = await services.generation.chain_lengths(user.user_id, [c.id for c in answer.chains])
    chains = [chain_json(c, lengths[c.id]) for c in answer.chains]
    return json_response(page("chains", chains, answer.next_page_token))


@routes.get("/v1/projects/{slug}/chains/{chain_id}")
async def get_chain(request: web.Request) -> web.Response:
    user = principal(request)
    services = clients(request)
    with phase(request, "db"):
        chain = await services.metadata.get_chain(
            user.user_id, request.match_info["slug"], request.match_info["chain_id"]
        )
        lengths = await services.generation.chain_lengths(user.user_id, [chain.id])
    return json_response(chain_json(chain, lengths[chain.id]))
