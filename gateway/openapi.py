"""The OpenAPI 3.1 description of the gateway, built once: served at /openapi.json, and the source
of the schemas that request bodies and query strings are validated against."""

from __future__ import annotations

from typing import Any

from gateway.conventions import HEADERS, RESPONSES, with_conventions
from gateway.schemas import ID, SCHEMAS, Schema, ref
from shared.contract import (
    DEFAULT_PAGE_SIZE,
    KINDS,
    MAX_BATCH,
    MAX_PAGE_SIZE,
    REQUEST_PHASES,
    SLUG_PATTERN,
    STATUSES,
    WAIT,
)


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, description: str, schema: Schema | None = None) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema or {"type": "string"},
        "description": description,
    }


_DOWNLOAD_URL = _query(
    "download_url",
    {"type": "boolean"},
    "true: the output also gives `download_url`, a short-lived presigned URL of the object store "
    "(none with the local store), and `download_expires_at`",
)


def _header(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


_PAGE = [
    _query(
        "page_size",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE},
        f"default {DEFAULT_PAGE_SIZE}",
    ),
    _query("page_token", {"type": "string", "maxLength": 1024}, "from a previous next_page_token"),
]
_SLUG = _path("slug", "the project's slug", {"type": "string", "pattern": SLUG_PATTERN})
_CHAIN_ID = _path("chain_id", "the chain's id")


def _json(schema_name: str, description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": ref(schema_name)}},
    }
    if headers:
        response["headers"] = headers
    return response


_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the new resource"}}
_PROBLEM = {"$ref": "#/components/responses/Problem"}


def _op(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    body_required: bool = True,
    parameters: list[Schema] | None = None,
    public: bool = False,
) -> Schema:
    operation: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,  # the error responses: gateway.conventions
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": ref(body)}},
        }
    if public:
        operation["security"] = []
    return operation


_RENDER_ID = _path("id", "the render's id")
_BATCH_ID = _path("id", "the batch's id")
_UPLOAD_ID = _path("id", "the upload's id")
_RULE_PATH = [_SLUG, _path("rule_id", "the rule's id")]
_TEXT_HEADER = {"schema": {"type": "string"}}
_SUBMIT_HEADERS = {
    **_LOCATION,
    "Server-Timing": {**_TEXT_HEADER, "description": f"{', '.join([*REQUEST_PHASES, WAIT, 'total'])} (ms)"},
    "Idempotent-Replayed": {
        "schema": {"const": "true"},
        "description": "the render was queued by an earlier request with this key",
    },
    "Preference-Applied": {**_TEXT_HEADER, "description": "`wait=N`: the wait honoured (N clamped to 60)"},
}
_SUBMIT_PARAMETERS = [
    _header(
        "Idempotency-Key",
        "1-255 visible ASCII characters: for 24 h, a retry with the same key and body returns the same "
        "render (racing ones too); the same key with another body is 422",
    ),
    _header(
        "Prefer",
        "`wait=N` (seconds, at most 60): hold the response until the render ends (200) or N seconds "
        "pass (202)",
    ),
]


def _submit(operation_id: str, summary: str, body: str, parameters: list[Schema] | None = None) -> Schema:
    return _op(
        operation_id,
        summary,
        {
            "200": _json("Render", "finished within `Prefer: wait`", _SUBMIT_HEADERS),
            "202": _json("Render", "queued", _SUBMIT_HEADERS),
        },
        body=body,
        parameters=[*(parameters or []), *_SUBMIT_PARAMETERS],
    )


def _event_stream(operation_id: str, summary: str, description: str, parameters: list[Schema]) -> Schema:
    return _op(
        operation_id,
        summary,
        {
            "200": {
                "description": description,
                "content": {
                    "text/event-stream": {
                        "schema": ref("ServerSentEvent"),
                        "x-event-schema": ref("RenderEvent"),
                    }
                },
            }
        },
        parameters=parameters,
    )


_RESUME = [
    _query("last_event_id", {"type": "integer", "minimum": 0}, "resume after this seq"),
    _header("Last-Event-ID", "resume after this seq (as EventSource sends it)"),
]
_BATCH_RESUME = [
    _query(
        "last_event_id",
        {"type": "string", "pattern": r"^\d{1,18}(\.\d{1,18})*$"},
        "resume after this event id (each render's last seq, in the batch's order)",
    ),
    _header("Last-Event-ID", "resume after this event id (as EventSource sends it)"),
]
_ENDPOINT_PATH = [_SLUG, _path("id", "the webhook endpoint's id")]
_DELIVERY_ID = _path("id", "the delivery's id (its `webhook-id`)")
_NO_STORE = {
    "Cache-Control": {
        "schema": {"const": "no-store"},
        "description": "the answer carries a signing secret: not to be stored by caches",
    }
}
_ROTATE_SUMMARY = (
    "; the previous secret keeps signing beside it for `overlap_s` (default 24 h): every delivery "
    "carries both signatures meanwhile, so receivers can switch without missing one"
)
_CHAIN_SUMMARY = (
    "Queue the chain's next render; unless the body names another reference, its reference is "
    "`{previous: true}`: the output of the nearest earlier render of the chain that succeeded (it "
    "waits for that one; a video is read by its last frame)"
)

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
            parameters=[_SLUG, _CHAIN_ID],
        ),
    },
    "/v1/projects/{slug}/chains/{chain_id}/renders": {
        "post": _submit("submitChainRender", _CHAIN_SUMMARY, "ChainRenderRequest", [_SLUG, _CHAIN_ID]),
        "get": _op(
            "listChainRenders",
            "A chain's renders in position order",
            {"200": _json("RenderList", "a page")},
            parameters=[_SLUG, _CHAIN_ID, *_PAGE],
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
    "/v1/projects/{slug}/webhooks": {
        "post": _op(
            "createWebhookEndpoint",
            "Create a webhook endpoint of the project: the events of all its renders are POSTed to it, "
            "signed with its own secret (in this answer only); 422 naming `url` for a URL on a private "
            "address",
            {"201": _json("WebhookEndpoint", "created, with its secret", {**_LOCATION, **_NO_STORE})},
            body="CreateWebhookEndpointRequest",
            parameters=[_SLUG],
        ),
        "get": _op(
            "listWebhookEndpoints",
            "List the project's webhook endpoints, oldest first (without their secrets)",
            {"200": _json("WebhookEndpointList", "the endpoints")},
            parameters=[_SLUG],
        ),
    },
    "/v1/projects/{slug}/webhooks/{id}": {
        "get": _op(
            "getWebhookEndpoint",
            "Get a webhook endpoint (without its secret)",
            {"200": _json("WebhookEndpoint", "the endpoint")},
            parameters=_ENDPOINT_PATH,
        ),
        "patch": _op(
            "updateWebhookEndpoint",
            "Change a webhook endpoint's url, events or description, or disable or enable it",
            {"200": _json("WebhookEndpoint", "the endpoint")},
            body="UpdateWebhookEndpointRequest",
            parameters=_ENDPOINT_PATH,
        ),
        "delete": _op(
            "deleteWebhookEndpoint",
            "Delete a webhook endpoint: its deliveries not yet made are given up (its log stays)",
            {"204": {"description": "deleted"}},
            parameters=_ENDPOINT_PATH,
        ),
    },
    "/v1/projects/{slug}/webhooks/{id}:rotate-secret": {
        "post": _op(
            "rotateWebhookEndpointSecret",
            f"Give a webhook endpoint a new signing secret{_ROTATE_SUMMARY}",
            {"200": _json("WebhookSecret", "the new secret, shown this once", _NO_STORE)},
            body="RotateWebhookSecretRequest",
            body_required=False,
            parameters=_ENDPOINT_PATH,
        ),
    },
    "/v1/projects/{slug}/webhooks/{id}/deliveries": {
        "get": _op(
            "listEndpointDeliveries",
            "A webhook endpoint's deliveries, newest first, each with its attempts",
            {"200": _json("DeliveryList", "a page")},
            parameters=[*_ENDPOINT_PATH, *_PAGE],
        ),
    },
    "/v1/webhooks/secret": {
        "get": _op(
            "getWebhookSecret",
            "Your signing secret for the webhooks renders name (made on first ask)",
            {"200": _json("WebhookSecret", "the secret", _NO_STORE)},
        ),
    },
    "/v1/webhooks/secret:rotate": {
        "post": _op(
            "rotateWebhookSecret",
            f"Make a new signing secret for the webhooks renders name{_ROTATE_SUMMARY}",
            {"200": _json("WebhookSecret", "the new secret", _NO_STORE)},
            body="RotateWebhookSecretRequest",
            body_required=False,
        ),
    },
    "/v1/deliveries/{id}:redeliver": {
        "post": _op(
            "redeliver",
            "Send a delivery again, at once, whatever its state: a new attempt with the same "
            "`webhook-id` (one to a disabled endpoint waits until the endpoint is enabled again)",
            {"202": _json("Delivery", "due now")},
            parameters=[_DELIVERY_ID],
        ),
    },
    "/v1/uploads": {
        "post": {
            **_op(
                "createUpload",
                "Upload an image to serve as a render's reference (`reference: {upload_id}`): the raw "
                "bytes as the body, or the `file` field of a multipart form. Checked to decode as an "
                "image (its type is the one it decodes as), kept until `expires_at`",
                {"201": _json("Upload", "stored", _LOCATION), "413": _PROBLEM},
            ),
            "requestBody": {
                "required": True,
                "content": {
                    "image/*": {"schema": {"type": "string", "contentMediaType": "image/*"}},
                    "application/octet-stream": {"schema": {"type": "string"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "contentMediaType": "image/*"}},
                            "required": ["file"],
                        }
                    },
                },
            },
        },
    },
    "/v1/uploads/{id}": {
        "get": _op(
            "getUpload",
            "An upload of yours that has not expired",
            {"200": _json("Upload", "it")},
            parameters=[_UPLOAD_ID],
        ),
        "delete": _op(
            "deleteUpload",
            "Delete an upload at once (renders queued with it that have not started go without it, or "
            "fail when it is required)",
            {"200": _json("Upload", "what it was")},
            parameters=[_UPLOAD_ID],
        ),
    },
    "/v1/renders": {
        "post": _submit("submitRender", "Queue one render; returns at once", "RenderRequest"),
        "get": _op(
            "listRenders",
            "List renders, newest first",
            {"200": _json("RenderList", "a page")},
            parameters=[
                _query("project", {"type": "string", "pattern": SLUG_PATTERN}, "a project's slug"),
                _query("chain_id", ID, "a chain's id"),
                _query("status", {"enum": list(STATUSES)}, "renders in this status"),
                _query("kind", {"enum": list(KINDS)}, "renders of this kind"),
                _query("batch_id", ID, "the renders of this batch"),
                _query(
                    "created_after",
                    {"type": "string", "format": "date-time", "maxLength": 64},
                    "created at or after this moment (RFC 3339, with its offset)",
                ),
                _query(
                    "created_before",
                    {"type": "string", "format": "date-time", "maxLength": 64},
                    "created before this moment (RFC 3339, with its offset)",
                ),
                _DOWNLOAD_URL,
                *_PAGE,
            ],
        ),
    },
    "/v1/renders:batch": {
        "post": _op(
            "submitBatch",
            f"Queue up to {MAX_BATCH} renders atomically: all of them, or (one bad item: 422 naming "
            "items[i]) none. Each render costs a token of the API key's rate limit; a batch of more "
            "renders than the limit's burst (RateLimit-Limit) is refused with 422 naming `items`",
            {
                "202": _json(
                    "BatchAccepted",
                    "queued",
                    {k: v for k, v in _SUBMIT_HEADERS.items() if k != "Preference-Applied"},
                )
            },
            body="BatchRequest",
            parameters=[_SUBMIT_PARAMETERS[0]],
        ),
    },
    "/v1/batches/{id}": {
        "get": _op(
            "getBatch",
            "A batch: counts by status and its renders",
            {"200": _json("Batch", "the batch")},
            parameters=[_BATCH_ID],
        ),
    },
    "/v1/batches/{id}:cancel": {
        "post": _op(
            "cancelBatch",
            "Cancel every queued render of a batch at once (none of them starts after this) and ask the "
            "workers of its running ones to stop them",
            {
                "202": _json("Batch", "cancelled, or cancelling (running renders)"),
                "200": _json("Batch", "every render had ended before this request: nothing changed"),
            },
            parameters=[_BATCH_ID],
        ),
    },
    "/v1/batches/{id}/events": {
        "get": _event_stream(
            "watchBatch",
            "The events of every render of the batch as Server-Sent Events, until all have ended",
            "`id:` = where the stream stands (each render's last seq, in the batch's order: `3.0.7`), "
            "`event:` = type, `data:` = a RenderEvent as JSON; comment lines as heartbeats",
            [_BATCH_ID, *_BATCH_RESUME],
        ),
    },
    "/render": {
        "post": _submit("submitRenderAlias", "The old system's path for POST /v1/renders", "RenderRequest"),
    },
    "/project/{slug}/chain/{chain_id}": {
        "post": _submit(
            "submitChainRenderAlias",
            "The old system's chain action: POST /v1/projects/{slug}/chains/{chain_id}/renders",
            "ChainRenderRequest",
            [_SLUG, _CHAIN_ID],
        ),
    },
    "/v1/renders/{id}": {
        "get": _op(
            "getRender",
            "Get a render",
            {"200": _json("Render", "the render")},
            parameters=[_RENDER_ID, _DOWNLOAD_URL],
        ),
        "delete": _op(
            "deleteRenderOutput",
            "Delete an ended render's output at once (its record stays, with output_deleted_at); 409 "
            "while it has not ended",
            {"200": _json("Render", "the render, without its output"), "409": _PROBLEM},
            parameters=[_RENDER_ID],
        ),
        "patch": _op(
            "updateRender",
            "Change a queued render's priority (409 once it has started)",
            {"200": _json("Render", "the render"), "409": _PROBLEM},
            body="UpdateRenderRequest",
            parameters=[_RENDER_ID],
        ),
    },
    "/v1/renders/{id}:cancel": {
        "post": _op(
            "cancelRender",
            "Cancel a queued render at once, or ask a running one's worker to stop it",
            {
                "202": _json("Render", "cancelled now (queued), or cancelling (running)"),
                "200": _json("Render", "cancelled or expired before this request: nothing changed"),
                "409": _PROBLEM,
            },
            parameters=[_RENDER_ID],
        ),
    },
    "/v1/renders/{id}:retry": {
        "post": _op(
            "retryRender",
            "Queue a new render with the inputs of a failed, cancelled or expired one (its project, chain, "
            "prompt, parameters and seed, reference, priority and timeout_s; no deadline), linked by "
            "`retry_of`; 409 for a render queued, running or succeeded",
            {
                "200": _json("Render", "finished within `Prefer: wait`", _SUBMIT_HEADERS),
                "202": _json("Render", "queued", _SUBMIT_HEADERS),
                "409": _PROBLEM,
            },
            parameters=[_RENDER_ID, *_SUBMIT_PARAMETERS],
        ),
    },
    "/v1/renders/{id}/events": {
        "get": _event_stream(
            "watchRender",
            "The render's events as Server-Sent Events, until its terminal event",
            "`id:` = seq, `event:` = type, `data:` = a RenderEvent as JSON; comment lines as heartbeats "
            "(every 15 s of silence); a finished render replays its events and the stream ends",
            [_RENDER_ID, *_RESUME],
        ),
    },
    "/v1/renders/{id}/ws": {
        "get": _op(
            "watchRenderWebSocket",
            "The render's events over WebSocket: one JSON text message per RenderEvent; closes with "
            "1000 after the terminal event (1012/1013 when interrupted: reconnect with last_event_id). "
            "Browsers, which cannot send Authorization, offer `Sec-WebSocket-Protocol: bearer, <key>`",
            {
                "101": {
                    "description": "switching to WebSocket (subprotocol `bearer` when offered)",
                    "x-message-schema": ref("RenderEvent"),
                },
                "400": {"$ref": "#/components/responses/Problem"},
            },
            parameters=[
                _RENDER_ID,
                *_RESUME,
                _header("Sec-WebSocket-Protocol", "`bearer, <api key>`: the API key, for browsers"),
            ],
        ),
    },
    "/v1/renders/{id}/deliveries": {
        "get": _op(
            "listRenderDeliveries",
            "The render's webhook deliveries (to its own webhook and to its project's endpoints), "
            "newest first, each with its attempts",
            {"200": _json("DeliveryList", "a page")},
            parameters=[_RENDER_ID, *_PAGE],
        ),
    },
    "/v1/renders/{id}/output": {
        "get": _op(
            "getRenderOutput",
            "The finished render's bytes (HEAD: their headers); 410 once deleted or past its retention. "
            "With an object store, a client that allows it (`redirect=true`, or `Prefer: redirect`) "
            "is sent to a short-lived presigned URL of the store instead (307)",
            {
                "200": {
                    "description": "the bytes",
                    "content": {"image/png": {}, "video/mp4": {}},
                    "headers": {
                        "ETag": {"schema": {"type": "string"}},
                        "Content-Disposition": {"schema": {"type": "string"}, "description": "its file name"},
                    },
                },
                "206": {"description": "the requested range", "content": {"image/png": {}, "video/mp4": {}}},
                "304": {"description": "unchanged (If-None-Match)"},
                "307": {
                    "description": "fetch it from the object store (redirect allowed, GET only)",
                    "headers": {
                        "Location": {"schema": {"type": "string"}, "description": "a presigned URL"},
                        "Preference-Applied": {"schema": {"type": "string"}, "description": "`redirect`"},
                    },
                },
                "409": {"$ref": "#/components/responses/Problem"},
                "410": _PROBLEM,
                "416": {"$ref": "#/components/responses/Problem"},
            },
            parameters=[
                _RENDER_ID,
                _header("Range", "a single `bytes=a-b` range"),
                _header("If-None-Match", "an ETag from a previous download"),
                _query(
                    "redirect",
                    {"type": "boolean"},
                    "true: a 307 to a presigned URL of the object store where there is one "
                    "(the local store streams regardless)",
                ),
                _header("Prefer", "`redirect`: as `redirect=true`"),
            ],
        ),
    },
    "/v1": {
        "get": _op("apiRoot", "The API's root: the key's user, and links", {"200": _json("ApiRoot", "")})
    },
    "/v1/": {"get": _op("apiRootSlash", "The same as GET /v1", {"200": _json("ApiRoot", "")})},
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
    "/metrics": {
        "get": _op(
            "metrics",
            "Prometheus metrics of this gateway process (text exposition format)",
            {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            public=True,
        ),
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Renderflow", "version": "1", "description": "Render generation over HTTP."},
    "security": [{"apiKey": []}],
    "paths": with_conventions(PATHS),
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"}},
        "responses": RESPONSES,
        "headers": HEADERS,
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
