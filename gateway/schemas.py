"""The JSON Schemas (2020-12) of the gateway's requests and resources: the OpenAPI components, and
what request bodies are validated against."""

from __future__ import annotations

from typing import Any

from shared.contract import (
    KINDS,
    MAX_BATCH,
    MAX_DEADLINE_S,
    MAX_ID,
    MAX_NAME,
    MAX_PROMPT,
    MAX_RULE_TEXT,
    MAX_TIMEOUT_S,
    MAX_URL,
    PARAMS,
    PRIORITY,
    SEED_MAX,
    SLUG_PATTERN,
    STATUSES,
    TIMINGS,
    Param,
)

Schema = dict[str, Any]

ERROR_MESSAGE = "x-error-message"
"""A schema extension: the message of a failure of the schema as a whole (oneOf, minProperties),
or of its pattern."""
NO_NUL = "^[^\\x00]*$"
"""Text that PostgreSQL can store: anything without NUL characters."""
REFERENCE_URL_PATTERN = "^[Hh][Tt][Tt][Pp][Ss]?://[^\\x00]*$"
"""An http(s) URL without NUL characters. Schemes are case-insensitive (RFC 3986), and the pattern
spells that out letter by letter because JSON Schema's (ECMA-262) regular expressions have no
inline case-insensitive flag."""
_EVENT_TYPES = ["queued", "started", "phase", "progress", "succeeded", "failed", "cancelled", "expired"]


def ref(name: str) -> Schema:
    """A reference to the component schema `name`."""
    return {"$ref": f"#/components/schemas/{name}"}


def _object(
    properties: dict[str, Schema],
    required: list[str] | None = None,
    *,
    error_message: str | None = None,
    **extra: Any,
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    if error_message:
        # What a validation failure of the whole object says (instead of jsonschema's own words).
        schema[ERROR_MESSAGE] = error_message
    return {**schema, **extra}


def _text(max_length: int, min_length: int = 1) -> Schema:
    return {
        "type": "string",
        "minLength": min_length,
        "maxLength": max_length,
        "pattern": NO_NUL,
        ERROR_MESSAGE: "must not contain NUL characters",
    }


def _param(param: Param[int] | Param[float]) -> Schema:
    return {
        "type": "integer" if isinstance(param.default, int) else "number",
        "minimum": param.minimum,
        "maximum": param.maximum,
        "default": param.default,
    }


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _list_of(key: str, item: str) -> Schema:
    return _object(
        {key: {"type": "array", "items": ref(item)}, "next_page_token": {"type": ["string", "null"]}},
        [key, "next_page_token"],
    )


ID: Schema = _text(MAX_ID)
"""An id (of a chain, rule or render)."""
DEADLINE: Schema = {
    "anyOf": [
        {"type": "string", "format": "date-time", "maxLength": 64},
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DEADLINE_S},
    ],
    "description": "when the render must have started, as an RFC 3339 date-time or seconds from now: "
    "not started by then, it ends `expired`; still running then, it is cancelled (error reason "
    "`deadline`)",
    ERROR_MESSAGE: "must be an RFC 3339 date-time or a number of seconds from now (more than 0, at most "
    f"{MAX_DEADLINE_S:g})",
}
RETENTION_S: Schema = {
    "type": "number",
    "exclusiveMinimum": 0,
    "description": "how long its output is kept once it succeeds, in seconds (default: the service's; at "
    "most the service's maximum, RENDERFLOW_GENERATION_MAX_RETENTION_S); then it is deleted and its "
    "download answers 410",
}
PRIORITY_INPUT: Schema = {
    **_param(PRIORITY),
    "description": "higher runs sooner among the user's queued renders (default 0)",
}
TIMEOUT_S: Schema = {
    "type": "number",
    "exclusiveMinimum": 0,
    "maximum": MAX_TIMEOUT_S,
    "description": "the most its generation may take, in seconds (the kind's configured maximum caps it); "
    "past it the render fails with code `timeout`",
}
_TIME: Schema = {"type": "string", "format": "date-time"}
_MAYBE_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
_MS: Schema = {"type": ["number", "null"], "minimum": 0}

SCHEMAS: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "An error (RFC 9457 problem details plus Renderflow's members).",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "request_id": {"type": "string"},
            "trace_id": {"type": ["string", "null"]},
            "errors": {
                "type": "array",
                "items": _object({"field": {"type": "string"}, "message": {"type": "string"}}),
            },
        },
        "required": ["type", "title", "status", "detail", "code", "request_id", "trace_id"],
    },
    "CreateProjectRequest": _object(
        {"slug": {"type": "string", "pattern": SLUG_PATTERN}, "name": _text(MAX_NAME)}, ["slug", "name"]
    ),
    "CreateChainRequest": _object({"name": _text(MAX_NAME)}, ["name"]),
    "CreateRuleRequest": _object(
        {
            "text": _text(MAX_RULE_TEXT),
            "chain_id": {**ID, "type": ["string", "null"]},
            "active": {"type": "boolean"},
        },
        ["text"],
    ),
    "UpdateRuleRequest": _object(
        {"text": _text(MAX_RULE_TEXT), "active": {"type": "boolean"}},
        minProperties=1,
        error_message="must change text or active",
    ),
    "RenderParamsInput": _object(
        {
            **{name: _param(param) for name, param in PARAMS["image"].items()},
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": SEED_MAX,
                "description": "random when omitted",
            },
            # A video's own parameters are accepted (and checked) for an image too, which ignores them.
            **{name: _param(param) for name, param in PARAMS["video"].items() if name not in PARAMS["image"]},
        }
    ),
    "ReferenceInput": _object(
        {
            "url": {
                "type": "string",
                "pattern": REFERENCE_URL_PATTERN,
                "maxLength": MAX_URL,
                ERROR_MESSAGE: "must be an http or https URL, without NUL characters",
            },
            "render_id": ID,
            "previous": {
                "const": True,
                "description": "the output of the nearest earlier render of its chain that succeeded (a "
                "video: its last frame; none for the first render, or when none succeeded)",
            },
            "required": {"type": "boolean", "default": False},
        },
        oneOf=[{"required": ["url"]}, {"required": ["render_id"]}, {"required": ["previous"]}],
        error_message="must have exactly one of url, render_id and previous",
    ),
    "RenderRequest": _object(
        {
            "project": {"type": "string", "pattern": SLUG_PATTERN},
            "chain_id": {**ID, "type": ["string", "null"]},
            "kind": {"enum": list(KINDS)},
            "prompt": _text(MAX_PROMPT),
            "negative_prompt": {**_text(MAX_PROMPT, min_length=0), "type": ["string", "null"]},
            "params": ref("RenderParamsInput"),
            "reference": ref("ReferenceInput"),
            "priority": PRIORITY_INPUT,
            "deadline": DEADLINE,
            "timeout_s": TIMEOUT_S,
            "retention_s": RETENTION_S,
        },
        ["project", "kind", "prompt"],
    ),
    "ChainRenderRequest": _object(
        {
            "kind": {"enum": list(KINDS)},
            "prompt": _text(MAX_PROMPT),
            "negative_prompt": {**_text(MAX_PROMPT, min_length=0), "type": ["string", "null"]},
            "params": ref("RenderParamsInput"),
            "reference": {**ref("ReferenceInput"), "description": "default: {previous: true}"},
            "priority": PRIORITY_INPUT,
            "deadline": DEADLINE,
            "timeout_s": TIMEOUT_S,
            "retention_s": RETENTION_S,
        },
        ["kind", "prompt"],
    ),
    "UpdateRenderRequest": _object({"priority": PRIORITY_INPUT}, ["priority"]),
    "BatchRequest": _object(
        {
            "items": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": ref("RenderRequest")},
            "deadline": {**DEADLINE, "description": "every item's deadline, unless it states its own"},
            "timeout_s": {**TIMEOUT_S, "description": "every item's timeout_s, unless it states its own"},
            "retention_s": {
                **RETENTION_S,
                "description": "every item's retention_s, unless it states its own",
            },
        },
        ["items"],
    ),
    "Project": _object(
        {
            "id": ID,
            "slug": {"type": "string"},
            "name": {"type": "string"},
            "default_chain_id": ID,
            "created_at": _TIME,
        },
        ["id", "slug", "name", "default_chain_id", "created_at"],
    ),
    "Chain": _object(
        {
            "id": ID,
            "project": {"type": "string"},
            "name": {"type": "string"},
            "is_default": {"type": "boolean"},
            "length": {"type": "integer"},
            "created_at": _TIME,
        },
        ["id", "project", "name", "is_default", "length", "created_at"],
    ),
    "Rule": _object(
        {
            "id": ID,
            "project": {"type": "string"},
            "chain_id": {"type": ["string", "null"]},
            "text": {"type": "string"},
            "active": {"type": "boolean"},
            "created_at": _TIME,
        },
        ["id", "project", "chain_id", "text", "active", "created_at"],
    ),
    "RenderParams": _object(
        {
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "steps": {"type": "integer"},
            "seed": {"type": "integer"},
            "duration_s": {"type": ["number", "null"]},
            "fps": {"type": ["integer", "null"]},
        },
    ),
    "Render": _object(
        {
            "id": ID,
            "project": {"type": "string"},
            "chain_id": ID,
            "position": {"type": "integer"},
            "kind": {"enum": list(KINDS)},
            "status": {"enum": list(STATUSES)},
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "queue_position": {"type": ["integer", "null"]},
            "eta_s": {"type": ["number", "null"]},
            "remaining_s": {"type": ["number", "null"]},
            "prompt": {"type": "string"},
            "negative_prompt": {"type": ["string", "null"]},
            "params": ref("RenderParams"),
            "rules": {"type": "array", "items": _object({"id": ID, "text": {"type": "string"}})},
            "reference": _nullable(
                _object(
                    {
                        "url": {"type": "string"},
                        "render_id": ID,
                        "previous": {"const": True},
                        "required": {"type": "boolean"},
                        "used": {
                            "type": ["boolean", "null"],
                            "description": "whether the render used its reference; null until it has run",
                        },
                        "reason": {
                            "type": ["string", "null"],
                            "description": "why the reference was not used (timeout, blocked_address, "
                            "http_404, not_found, nothing_to_continue, ...)",
                        },
                        "message": {"type": ["string", "null"], "description": "the details of `reason`"},
                        "source_render_id": {
                            "type": ["string", "null"],
                            "description": "the render whose output served as the reference (for "
                            "`previous`: the render this one continued from)",
                        },
                    }
                )
            ),
            "batch_id": {"type": ["string", "null"]},
            "output": _nullable(
                _object(
                    {
                        "url": {"type": "string"},
                        "content_type": {"type": "string"},
                        "bytes": {"type": "integer"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "duration_s": {"type": ["number", "null"]},
                        "sha256": {"type": "string", "description": "the SHA-256 of the bytes, hex"},
                    }
                )
            ),
            "error": _nullable(
                _object(
                    {
                        "code": {"type": "string"},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "retryable": {"type": "boolean"},
                    }
                )
            ),
            "timings": _object({f"{name}_ms": _MS for name in TIMINGS}),
            "attempts": {"type": "integer"},
            "trace_id": {"type": ["string", "null"]},
            "created_at": _TIME,
            "started_at": _MAYBE_TIME,
            "finished_at": _MAYBE_TIME,
            "last_progress_at": _MAYBE_TIME,
            "stalled": {
                "type": "boolean",
                "description": "running, but without progress for longer than the stall threshold",
            },
            "waiting_on": {
                "type": ["string", "null"],
                "description": "while queued behind its chain predecessor: that render's id",
            },
            "deadline": {**_MAYBE_TIME, "description": "when it must have started (null: no deadline)"},
            "timeout_s": {
                "type": ["number", "null"],
                "description": "the most its generation may take, as asked (null: the kind's maximum)",
            },
            "priority": {
                "type": "integer",
                "description": "higher runs sooner among the user's queued renders",
            },
            "retention_s": {
                "type": ["number", "null"],
                "description": "how long its output is kept once it succeeded (null: for ever)",
            },
            "output_expires_at": {**_MAYBE_TIME, "description": "when its output will be deleted"},
            "output_deleted_at": {
                **_MAYBE_TIME,
                "description": "when its output was deleted (by its user, or past its retention): "
                "`output` is null, and the download answers 410",
            },
            "retry_of": {"type": ["string", "null"], "description": "the render this one retries"},
            "retries": {
                "type": "array",
                "items": ID,
                "description": "the renders that retried this one, oldest first",
            },
        },
    ),
    "RenderEvent": _object(
        {
            "seq": {"type": "integer"},
            "type": {"enum": _EVENT_TYPES},
            "render_id": ID,
            "at": _TIME,
            "progress": {"type": "number"},
            "phase": {"type": "string"},
            "message": {"type": "string"},
            "error": {"type": "object"},
        },
        ["seq", "type", "render_id", "at"],
    ),
    "ServerSentEvent": _object(
        {
            "event": {"enum": _EVENT_TYPES},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": ref("RenderEvent"),
            },
            "id": {
                "type": "string",
                "pattern": r"^[0-9]+(\.[0-9]+)*$",
                "description": "where to resume: the event's seq, or in a batch's stream each render's "
                "last seq in the batch's order, dot-separated",
            },
            "retry": {"type": "integer", "minimum": 0},
        },
        ["event", "data"],
        description="One event of a text/event-stream, as a client reads it: `data` is a RenderEvent.",
    ),
    "ProjectList": _list_of("projects", "Project"),
    "ChainList": _list_of("chains", "Chain"),
    "RuleList": _list_of("rules", "Rule"),
    "RenderList": _list_of("renders", "Render"),
    "BatchAccepted": _object(
        {
            "id": {**ID, "description": "the batch's id, as `GET /v1/batches/{id}` names it"},
            "batch_id": {**ID, "description": "the same as `id` (the name of earlier versions)"},
            "renders": {"type": "array", "items": ref("Render"), "description": "its renders, in order"},
        },
        ["id", "batch_id", "renders"],
    ),
    "Batch": _object(
        {
            "id": ID,
            "counts": _object(
                {name: {"type": "integer", "minimum": 0} for name in [*STATUSES, "total"]},
                [*STATUSES, "total"],
            ),
            "renders": {"type": "array", "items": ref("Render")},
            "created_at": _TIME,
        },
        ["id", "counts", "renders", "created_at"],
    ),
    "ApiRoot": _object(
        {
            "api": {"const": "v1", "description": "the API's version"},
            "user_id": {"type": "string", "description": "the user the API key belongs to"},
            "openapi": {"type": "string", "description": "the OpenAPI document"},
            "docs": {"type": "string", "description": "the same, as a page to read"},
            "renders": {"type": "string", "description": "renders: submit and list"},
            "projects": {"type": "string", "description": "projects: create and list"},
        },
        ["api", "user_id", "openapi", "docs", "renders", "projects"],
    ),
    "Health": _object(
        {
            "status": {
                "enum": ["ok", "degraded"],
                "description": "`degraded`: the image fetcher is not serving (renders with a reference "
                "URL wait for it)",
            },
            "checks": {
                "type": "object",
                "description": "each service's gRPC health: `serving` or `not_serving` (readiness only)",
            },
        },
        ["status"],
    ),
}
