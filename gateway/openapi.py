"""The OpenAPI 3.1 description of the gateway, built once: served at /openapi.json, and the source
of the schemas that request bodies and query strings are validated against."""

from __future__ import annotations

from typing import Any

from gateway.schemas import ID, MAX_PAGE_SIZE, SCHEMAS, SLUG_PATTERN, STATUSES, Schema, ref


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, schema: Schema | None = None) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


def _header(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


_PAGE = [
    _query("page_size", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE}, "default 50"),
    _query("page_token", {"type": "string", "maxLength": 1024}, "from a previous next_page_token"),
]
_SLUG = _path("slug", {"type": "string", "pattern": SLUG_PATTERN})


def _json(schema_name: str, description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": ref(schema_name)}},
    }
    if headers:
        response["headers"] = headers
    return response


_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the new resource"}}
_PROBLEMS = {
    str(status): {"$ref": "#/components/responses/Problem"} for status in (401, 404, 422, 429, 500, 503)
}


def _op(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> Schema:
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {**responses, **({} if public else _PROBLEMS)},
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
    if public:
        operation["security"] = []
    return operation


_RENDER_ID = _path("id")
_RULE_PATH = [_SLUG, _path("rule_id")]

PATHS: dict[str, dict[str, Schema]] = {
    "/v1/projects": {
        "post": _op(
            "createProject",
            "Create a project and its default chain",
            {"201": _json("Project", "created", _LOCATION)},
            body="CreateProjectRequest",
        ),
        "get": _op(
            "listProjects", "List projects", {"200": _json("ProjectList", "a page")}, parameters=_PAGE
        ),
    },
    "/v1/projects/{slug}": {
        "get": _op(
            "getProject", "Get a project", {"200": _json("Project", "the project")}, parameters=[_SLUG]
        ),
    },
    "/v1/projects/{slug}/chains": {
        "post": _op(
            "createChain",
            "Create a chain",
            {"201": _json("Chain", "created", _LOCATION)},
            body="CreateChainRequest",
            parameters=[_SLUG],
        ),
        "get": _op(
            "listChains",
            "List a project's chains",
            {"200": _json("ChainList", "a page")},
            parameters=[_SLUG, *_PAGE],
        ),
    },
    "/v1/projects/{slug}/chains/{chain_id}": {
        "get": _op(
            "getChain",
            "Get a chain",
            {"200": _json("Chain", "the chain")},
            parameters=[_SLUG, _path("chain_id")],
        ),
    },
    "/v1/projects/{slug}/chains/{chain_id}/renders": {
        "get": _op(
            "listChainRenders",
            "A chain's renders in position order",
            {"200": _json("RenderList", "a page")},
            parameters=[_SLUG, _path("chain_id"), *_PAGE],
        ),
    },
    "/v1/projects/{slug}/rules": {
        "post": _op(
            "createRule",
            "Create a rule (project-wide, or a chain's)",
            {"201": _json("Rule", "created", _LOCATION)},
            body="CreateRuleRequest",
            parameters=[_SLUG],
        ),
        "get": _op(
            "listRules",
            "List a project's rules",
            {"200": _json("RuleList", "a page")},
            parameters=[_SLUG, *_PAGE],
        ),
    },
    "/v1/projects/{slug}/rules/{rule_id}": {
        "patch": _op(
            "updateRule",
            "Change a rule's text or activity",
            {"200": _json("Rule", "the rule")},
            body="UpdateRuleRequest",
            parameters=_RULE_PATH,
        ),
        "delete": _op(
            "deleteRule", "Delete a rule", {"204": {"description": "deleted"}}, parameters=_RULE_PATH
        ),
    },
    "/v1/renders": {
        "post": _op(
            "submitRender",
            "Queue one render; returns at once",
            {
                "202": _json(
                    "Render",
                    "queued",
                    {
                        **_LOCATION,
                        "Server-Timing": {
                            "schema": {"type": "string"},
                            "description": "auth, validation, db, enqueue, total (ms)",
                        },
                        "Idempotent-Replayed": {
                            "schema": {"const": "true"},
                            "description": "the render was queued by an earlier request with this key",
                        },
                    },
                )
            },
            body="RenderRequest",
            parameters=[_header("Idempotency-Key", "a retry with the same key returns the same render")],
        ),
        "get": _op(
            "listRenders",
            "List renders, newest first",
            {"200": _json("RenderList", "a page")},
            parameters=[
                _query("project", {"type": "string", "pattern": SLUG_PATTERN}, "a project's slug"),
                _query("chain_id", ID),
                _query("status", {"enum": STATUSES}),
                *_PAGE,
            ],
        ),
    },
    "/v1/renders/{id}": {
        "get": _op(
            "getRender", "Get a render", {"200": _json("Render", "the render")}, parameters=[_RENDER_ID]
        ),
    },
    "/v1/renders/{id}:cancel": {
        "post": _op(
            "cancelRender",
            "Cancel a queued or running render",
            {"202": _json("Render", "cancelling"), "409": {"$ref": "#/components/responses/Problem"}},
            parameters=[_RENDER_ID],
        ),
    },
    "/v1/renders/{id}/events": {
        "get": _op(
            "watchRender",
            "The render's events as Server-Sent Events, until its terminal event",
            {
                "200": {
                    "description": "`id:` = seq, `event:` = type, `data:` = a RenderEvent as JSON; "
                    "comment lines as heartbeats",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-event-schema": ref("RenderEvent"),
                        }
                    },
                }
            },
            parameters=[
                _RENDER_ID,
                _query("last_event_id", {"type": "integer", "minimum": 0}, "resume after this seq"),
                _header("Last-Event-ID", "resume after this seq (as EventSource sends it)"),
            ],
        ),
    },
    "/v1/renders/{id}/output": {
        "get": _op(
            "getRenderOutput",
            "The finished render's bytes",
            {
                "200": {
                    "description": "the bytes",
                    "content": {"image/png": {}, "video/mp4": {}},
                    "headers": {"ETag": {"schema": {"type": "string"}}},
                },
                "206": {"description": "the requested range", "content": {"image/png": {}, "video/mp4": {}}},
                "304": {"description": "unchanged (If-None-Match)"},
                "409": {"$ref": "#/components/responses/Problem"},
                "416": {"$ref": "#/components/responses/Problem"},
            },
            parameters=[
                _RENDER_ID,
                _header("Range", "a single `bytes=a-b` range"),
                _header("If-None-Match", "an ETag from a previous download"),
            ],
        ),
    },
    "/healthz": {"get": _op("healthz", "Liveness", {"200": _json("Health", "alive")}, public=True)},
    "/readyz": {
        "get": _op(
            "readyz",
            "Readiness: the metadata and generation services answer",
            {"200": _json("Health", "ready"), "503": {"$ref": "#/components/responses/Problem"}},
            public=True,
        ),
    },
    "/openapi.json": {
        "get": _op(
            "openapi",
            "This document",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            public=True,
        ),
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Renderflow", "version": "1", "description": "Render generation over HTTP."},
    "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
    "security": [{"apiKey": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"}},
        "responses": {
            "Problem": {
                "description": "an error",
                "content": {"application/problem+json": {"schema": ref("Problem")}},
            },
        },
    },
}
"""The whole document, as served."""


def query_parameters(operation_id: str) -> dict[str, Schema]:
    """The query parameters of an operation, by name, with their schemas."""
    for operations in PATHS.values():
        for operation in operations.values():
            if operation["operationId"] == operation_id:
                return {p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"}
    raise KeyError(operation_id)
