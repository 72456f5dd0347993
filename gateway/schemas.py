"""The JSON Schemas (2020-12) of the gateway's requests and resources: the OpenAPI components, and
what request bodies are validated against."""

from __future__ import annotations

from typing import Any

from gateway.conventions import PROBLEM_CODE
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
    WORKFLOW_PATTERN,
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


def _param(param: Param[int] | Param[float], description: str | None = None) -> Schema:
    schema: Schema = {
        "type": "integer" if isinstance(param.default, int) else "number",
        "minimum": param.minimum,
        "maximum": param.maximum,
        "default": param.default,
    }
    if description:
        schema["description"] = f"{description} (default {param.default:g})"
    return schema


def _described(schema: Schema, description: str) -> Schema:
    """`schema`, with what it means to a client."""
    return {**schema, "description": description}


def _nullable(schema: Schema, description: str) -> Schema:
    return {"anyOf": [schema, {"type": "null"}], "description": description}


_NEXT_PAGE_TOKEN: Schema = {
    "type": ["string", "null"],
    "description": "pass it back as `page_token` (with the same filters) for the next page; null on the "
    "last page",
}


def _list_of(key: str, item: str, description: str) -> Schema:
    return _object(
        {
            key: {"type": "array", "items": ref(item), "description": description},
            "next_page_token": _NEXT_PAGE_TOKEN,
        },
        [key, "next_page_token"],
    )


ID: Schema = _text(MAX_ID)
"""An id (of a chain, rule or render)."""


def _id(of: str) -> Schema:
    """An id, described as the id of `of` (`the render's id`)."""
    return _described(ID, f"the {of}'s id")


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
PRIORITY_INPUT: Schema = _param(PRIORITY, "higher runs sooner among the user's queued renders")
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
_CREATED_AT: Schema = _described(_TIME, "when it was created (RFC 3339, UTC)")
_SLUG_INPUT: Schema = {"type": "string", "pattern": SLUG_PATTERN}
_PROJECT: Schema = {"type": "string", "description": "its project's slug"}
_CHAIN_ID_INPUT: Schema = _described(
    {**ID, "type": ["string", "null"]},
    "a chain of the project; omitted or null: the project's default chain",
)
_KIND_INPUT: Schema = {"enum": list(KINDS), "description": "what to make: an image, or a video"}
_PROMPT_INPUT: Schema = _described(_text(MAX_PROMPT), "what to render")
_NEGATIVE_PROMPT_INPUT: Schema = _described(
    {**_text(MAX_PROMPT, min_length=0), "type": ["string", "null"]},
    "what to keep out of the render; omitted or null: nothing",
)
_PARAM_DESCRIPTIONS = {
    "width": "the output's width, in pixels",
    "height": "the output's height, in pixels",
    "steps": "how many steps the generator takes: more take longer",
    "duration_s": "a video's length, in seconds, ignored for an image",
    "fps": "a video's frames per second, ignored for an image",
}
"""What each parameter of `shared.contract.PARAMS` means (its bounds and default are the contract's)."""
_TIMINGS = {
    "auth": "in the gateway, turning the API key into a user",
    "validation": "in the gateway, reading and validating the request",
    "db": "in the gateway, on the metadata and generation reads of the submit, in all",
    "enqueue": "queuing it (generation's Submit)",
    "queue_wait": "queued, from its submission until a worker claimed it",
    "image_fetch": "fetching its reference image (only with a reference)",
    "generation": "in the generator",
    "store": "writing its output",
    "total": "from its submission until its output was stored (set when it succeeds)",
}
"""What each of the render's `timings` (`<name>_ms`, `shared.contract.TIMINGS`) measures."""
_EVENT_TYPE = (
    "what happened: `queued` (also when it goes back to the queue, or a waiting chain render is "
    "released), `started` (a worker took it), `phase` (a phase began), `progress` (it rose), then one "
    "of `succeeded`, `failed`, `cancelled` and `expired`, which ends its stream"
)
_RENDER_ERROR = _object(
    {
        "code": {
            "type": "string",
            "description": "what ended it: `reference_fetch_failed` (a required reference could not be "
            "had), `generation_failed` (the generator failed, transient failures retried first), "
            "`timeout` (its generation took longer than timeout_s or the kind's maximum), "
            "`dependency_failed` (a chain render with a required reference had nothing to continue "
            "from), `internal` (a fault of Renderflow); `cancelled` for a cancelled render, `expired` "
            "for one not started by its deadline",
        },
        "reason": {
            "type": "string",
            "description": "the finer cause, empty when there is none: for `reference_fetch_failed` the "
            "fetch's (`timeout`, `too_large`, `not_an_image`, `blocked_address`, `http_404`, ...) or "
            "`not_found`, `not_ready`, `undecodable_video` for a render as reference; for "
            "`dependency_failed` `none_succeeded` or `missing`; `deadline` for a render its deadline "
            "cancelled or expired",
        },
        "message": {"type": "string", "description": "what happened, for people"},
        "retryable": {
            "type": "boolean",
            "description": "whether submitting the same render again may succeed",
        },
    }
)

WEBHOOK_EVENTS = ["queued", "started", "progress", "completed"]
"""What a webhook may receive (generation's own list: a unit test keeps the two in step)."""
MAX_WEBHOOK_DESCRIPTION = 500
"""The longest description of a webhook endpoint (generation's limit)."""
MAX_OVERLAP_S = 7 * 86400
"""The longest a rotated secret may keep signing beside the new one, in seconds."""
_WEBHOOK_EVENT = (
    "`queued` (it was accepted, or went back to the queue), `started` (a worker took it), `progress` "
    "(it rose; a receiver that lags behind gets only the newest), `completed` (it ended: succeeded, "
    "failed, cancelled or expired)"
)
_WEBHOOK_URL_INPUT: Schema = {
    "type": "string",
    "pattern": REFERENCE_URL_PATTERN,
    "maxLength": MAX_URL,
    ERROR_MESSAGE: "must be an http or https URL, without NUL characters",
    "description": "where to POST the events: an absolute http or https URL on a public address "
    "(private, loopback, link-local and metadata addresses are refused with 422, in any spelling, "
    "unless the operator allows them); redirects are not followed",
}


def _webhook_events(description: str, *, default: bool = True) -> Schema:
    schema: Schema = {
        "type": "array",
        "items": {"enum": WEBHOOK_EVENTS},
        "minItems": 1,
        "uniqueItems": True,
        ERROR_MESSAGE: f"must name at least one of {', '.join(WEBHOOK_EVENTS)}, each once",
        "description": f"{description}: {_WEBHOOK_EVENT}",
    }
    if default:
        schema["default"] = ["completed"]
    return schema


_WEBHOOK_EVENTS_SHOWN: Schema = {
    "type": "array",
    "items": {"enum": WEBHOOK_EVENTS},
    "description": f"the events it receives, in their natural order: {_WEBHOOK_EVENT}",
}
_WEBHOOK_DESCRIPTION_INPUT: Schema = _described(
    _text(MAX_WEBHOOK_DESCRIPTION, min_length=0), "what it is for, for people (default empty)"
)
_OVERLAP_S: Schema = {
    "type": "number",
    "minimum": 0,
    "maximum": MAX_OVERLAP_S,
    "description": "how long the previous secret keeps signing beside the new one (every delivery "
    "carries both signatures meanwhile), in seconds; omitted or 0: the service's default, 24 h",
}
_DELIVERY_STATES = ["pending", "delivered", "failed"]

SCHEMAS: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "An error (RFC 9457 problem details plus Renderflow's members).",
        "properties": {
            "type": {
                "type": "string",
                "description": "`https://renderflow.dev/problems/` followed by the code",
            },
            "title": {
                "type": "string",
                "description": "a short, fixed summary of the kind of error (`Validation failed`)",
            },
            "status": {"type": "integer", "description": "the response's HTTP status"},
            "detail": {"type": "string", "description": "what went wrong with this request, for people"},
            "code": PROBLEM_CODE,
            "request_id": {
                "type": "string",
                "description": "the request's id, also in the X-Request-Id response header",
            },
            "trace_id": {
                "type": ["string", "null"],
                "description": "the request's trace id (null when tracing is off); quote it in support "
                "requests",
            },
            "errors": {
                "type": "array",
                "items": _object(
                    {
                        "field": {
                            "type": "string",
                            "description": "the invalid field by its path in the body (`params.width`, "
                            "`items[3].prompt`; empty: the body as a whole), or the header or query "
                            "parameter by its name (`Idempotency-Key`, `page_token`)",
                        },
                        "message": {
                            "type": "string",
                            "description": "what is wrong with it (`must be at most 2048`)",
                        },
                    }
                ),
                "description": "only for `validation_failed`: each invalid field, with what is wrong with it",
            },
        },
        "required": ["type", "title", "status", "detail", "code", "request_id", "trace_id"],
    },
    "CreateProjectRequest": _object(
        {
            "slug": _described(
                _SLUG_INPUT,
                "names the project in paths (`/v1/projects/{slug}`), unique among your projects (409 "
                "if taken): 2 to 63 of a-z, 0-9 and `-`, not starting with `-`",
            ),
            "name": _described(_text(MAX_NAME), "the project's name, for people"),
        },
        ["slug", "name"],
    ),
    "CreateChainRequest": _object(
        {"name": _described(_text(MAX_NAME), "the chain's name, for people")}, ["name"]
    ),
    "CreateRuleRequest": _object(
        {
            "text": _described(
                _text(MAX_RULE_TEXT),
                "what the generator is given with the prompt of every render submitted afterwards in "
                "the project (or in the rule's chain only)",
            ),
            "chain_id": _described(
                {**ID, "type": ["string", "null"]},
                "the chain of the project it applies to; omitted or null: every chain of the project",
            ),
            "active": {
                "type": "boolean",
                "description": "whether renders submitted from now on are made with it (default true)",
            },
        },
        ["text"],
    ),
    "UpdateRuleRequest": _object(
        {
            "text": _described(_text(MAX_RULE_TEXT), "its new text (renders already queued keep the old)"),
            "active": {
                "type": "boolean",
                "description": "whether renders submitted from now on are made with it",
            },
        },
        minProperties=1,
        error_message="must change text or active",
    ),
    "RenderParamsInput": _object(
        {
            **{name: _param(param, _PARAM_DESCRIPTIONS[name]) for name, param in PARAMS["image"].items()},
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": SEED_MAX,
                "description": "random when omitted",
            },
            # A video's own parameters are accepted (and checked) for an image too, which ignores them.
            **{
                name: _param(param, _PARAM_DESCRIPTIONS[name])
                for name, param in PARAMS["video"].items()
                if name not in PARAMS["image"]
            },
            "workflow": {
                "type": ["string", "null"],
                "pattern": WORKFLOW_PATTERN,
                ERROR_MESSAGE: "must be a workflow's name: letters, digits, '_', '.' and '-', at most 64",
                "description": "for a worker whose backend is comfyui: the registered workflow that "
                "makes it (the operator's list); omitted or null: the backend's default for the kind and "
                "reference. An unknown one fails the render with reason `unknown_workflow`; other backends "
                "ignore it",
            },
        }
    ),
    "ReferenceInput": _object(
        {
            "url": {
                "type": "string",
                "pattern": REFERENCE_URL_PATTERN,
                "maxLength": MAX_URL,
                ERROR_MESSAGE: "must be an http or https URL, without NUL characters",
                "description": "an image on the web (http or https), fetched when the render runs",
            },
            "render_id": _described(
                ID, "another of your renders, whose output it starts from (a video: its last frame)"
            ),
            "previous": {
                "const": True,
                "description": "the output of the nearest earlier render of its chain that succeeded (a "
                "video: its last frame; none for the first render, or when none succeeded)",
            },
            "upload_id": _described(
                ID, "an image you uploaded (POST /v1/uploads) and that has not expired, checked when queued"
            ),
            "required": {
                "type": "boolean",
                "default": False,
                "description": "fail the render when the reference cannot be had, instead of going on "
                "without it",
            },
        },
        oneOf=[
            {"required": ["url"]},
            {"required": ["render_id"]},
            {"required": ["previous"]},
            {"required": ["upload_id"]},
        ],
        error_message="must have exactly one of url, render_id, previous and upload_id",
    ),
    "WebhookInput": _object(
        {
            "url": _WEBHOOK_URL_INPUT,
            "events": _webhook_events("which of its events to send"),
        },
        ["url"],
        description="where to send the render's events as they happen, signed with your webhook secret "
        "(`GET /v1/webhooks/secret`); a refused URL is 422 naming `webhook.url`",
    ),
    "RenderRequest": _object(
        {
            "project": _described(_SLUG_INPUT, "the slug of the project to render in"),
            "chain_id": _CHAIN_ID_INPUT,
            "kind": _KIND_INPUT,
            "prompt": _PROMPT_INPUT,
            "negative_prompt": _NEGATIVE_PROMPT_INPUT,
            "params": ref("RenderParamsInput"),
            "reference": ref("ReferenceInput"),
            "priority": PRIORITY_INPUT,
            "deadline": DEADLINE,
            "timeout_s": TIMEOUT_S,
            "retention_s": RETENTION_S,
            "webhook": ref("WebhookInput"),
        },
        ["project", "kind", "prompt"],
    ),
    "ChainRenderRequest": _object(
        {
            "kind": _KIND_INPUT,
            "prompt": _PROMPT_INPUT,
            "negative_prompt": _NEGATIVE_PROMPT_INPUT,
            "params": ref("RenderParamsInput"),
            "reference": {**ref("ReferenceInput"), "description": "default: {previous: true}"},
            "priority": PRIORITY_INPUT,
            "deadline": DEADLINE,
            "timeout_s": TIMEOUT_S,
            "retention_s": RETENTION_S,
            "webhook": ref("WebhookInput"),
        },
        ["kind", "prompt"],
    ),
    "UpdateRenderRequest": _object({"priority": PRIORITY_INPUT}, ["priority"]),
    "BatchRequest": _object(
        {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH,
                "items": ref("RenderRequest"),
                "description": "the renders to queue, each as the body of `POST /v1/renders`: all of them "
                "or none (an invalid item's faults are named `items[i]...`)",
            },
            "deadline": {**DEADLINE, "description": "every item's deadline, unless it states its own"},
            "timeout_s": {**TIMEOUT_S, "description": "every item's timeout_s, unless it states its own"},
            "retention_s": {
                **RETENTION_S,
                "description": "every item's retention_s, unless it states its own",
            },
            "webhook": {
                **ref("WebhookInput"),
                "description": "every item's webhook, unless it names its own (a refused URL is named "
                "by the first item it applies to: `items[i].webhook.url`)",
            },
        },
        ["items"],
    ),
    "Project": _object(
        {
            "id": _id("project"),
            "slug": {
                "type": "string",
                "description": "names the project in paths (`/v1/projects/{slug}`), unique among yours",
            },
            "name": {"type": "string", "description": "the project's name, for people"},
            "default_chain_id": _described(
                ID, "the chain made with the project, where renders that name no chain go"
            ),
            "created_at": _CREATED_AT,
        },
        ["id", "slug", "name", "default_chain_id", "created_at"],
    ),
    "Chain": _object(
        {
            "id": _id("chain"),
            "project": _PROJECT,
            "name": {"type": "string", "description": "the chain's name, for people"},
            "is_default": {
                "type": "boolean",
                "description": "whether it is its project's default chain, where renders that name no "
                "chain go",
            },
            "length": {
                "type": "integer",
                "description": "how many positions it has allocated to renders: its last render's "
                "position (0 before its first)",
            },
            "created_at": _CREATED_AT,
        },
        ["id", "project", "name", "is_default", "length", "created_at"],
    ),
    "Rule": _object(
        {
            "id": _id("rule"),
            "project": _PROJECT,
            "chain_id": {
                "type": ["string", "null"],
                "description": "the chain it applies to; null: every chain of the project",
            },
            "text": {
                "type": "string",
                "description": "what the generator is given with the prompt of every render submitted "
                "while the rule is active",
            },
            "active": {
                "type": "boolean",
                "description": "whether renders submitted from now on are made with it",
            },
            "created_at": _CREATED_AT,
        },
        ["id", "project", "chain_id", "text", "active", "created_at"],
    ),
    "RenderParams": _object(
        {
            "width": {"type": "integer", "description": "the output's width, in pixels"},
            "height": {"type": "integer", "description": "the output's height, in pixels"},
            "steps": {"type": "integer", "description": "the generator's steps"},
            "seed": {
                "type": "integer",
                "description": "the seed it is made with (the random one chosen when the request gave none)",
            },
            "duration_s": {
                "type": ["number", "null"],
                "description": "a video's length, in seconds; null for an image",
            },
            "fps": {
                "type": ["integer", "null"],
                "description": "a video's frames per second; null for an image",
            },
            "workflow": {
                "type": ["string", "null"],
                "description": "the workflow it asked for; null: the backend's default",
            },
        },
    ),
    "Render": _object(
        {
            "id": _id("render"),
            "project": _PROJECT,
            "chain_id": _described(
                ID, "its chain's id (the project's default chain when the request named none)"
            ),
            "position": {
                "type": "integer",
                "description": "its place in its chain, from 1, taken when it was submitted",
            },
            "kind": {"enum": list(KINDS), "description": "what it makes: an image, or a video"},
            "status": {
                "enum": list(STATUSES),
                "description": "`queued` (waiting for a worker slot, a retry's backoff or its chain "
                "predecessor), `running` (a worker has it; it may go back to `queued` for another attempt), "
                "or for good `succeeded`, `failed` (see `error`), `cancelled`, or `expired` (its deadline "
                "passed before it started)",
            },
            "progress": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "how far its generation has come, from 0 to 1 (1 once it succeeded)",
            },
            "queue_position": {
                "type": ["integer", "null"],
                "description": "while queued: how many renders (of every user) the workers will take "
                "before it (0: it is next); null once it has started, or while it waits for its chain "
                "predecessor",
            },
            "eta_s": {
                "type": ["number", "null"],
                "description": "while queued: the estimated seconds until it starts, from recent renders; "
                "null once it has started, while it waits for its chain predecessor, or without the "
                "history to tell",
            },
            "remaining_s": {
                "type": ["number", "null"],
                "description": "while running: the estimated seconds until it ends, from its own pace "
                "(before any progress, from recent renders of its kind and size); null otherwise",
            },
            "prompt": {"type": "string", "description": "what it renders, as submitted"},
            "negative_prompt": {
                "type": ["string", "null"],
                "description": "what to keep out of it, as submitted; null: nothing",
            },
            "params": ref("RenderParams"),
            "rules": {
                "type": "array",
                "items": _object(
                    {
                        "id": _id("rule"),
                        "text": {"type": "string", "description": "the rule's text, as it was then"},
                    }
                ),
                "description": "the rules active when it was submitted (the project's and its chain's): a "
                "snapshot, which later changes to the rules leave as it is",
            },
            "reference": _nullable(
                _object(
                    {
                        "url": {"type": "string", "description": "the image URL it was asked to start from"},
                        "render_id": _described(ID, "the render whose output it was asked to start from"),
                        "upload_id": _described(ID, "the upload it was asked to start from"),
                        "previous": {
                            "const": True,
                            "description": "it continues from the nearest earlier render of its chain that "
                            "succeeded",
                        },
                        "required": {
                            "type": "boolean",
                            "description": "whether a reference that cannot be had fails the render (false: "
                            "it goes on without it)",
                        },
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
                ),
                "the reference image it was asked to start from (one of `url`, `render_id` and "
                "`previous`), and what became of it; null: none",
            ),
            "batch_id": {
                "type": ["string", "null"],
                "description": "the batch it was submitted in; null: submitted alone",
            },
            "output": _nullable(
                _object(
                    {
                        "url": {
                            "type": "string",
                            "description": "where to download it: `/v1/renders/{id}/output`, on this gateway",
                        },
                        "content_type": {
                            "type": "string",
                            "description": "its media type: `image/png` or `video/mp4` (the `http` backend "
                            "may also make `image/jpeg` or `image/webp`)",
                        },
                        "bytes": {"type": "integer", "description": "its size, in bytes"},
                        "width": {"type": "integer", "description": "its width, in pixels"},
                        "height": {"type": "integer", "description": "its height, in pixels"},
                        "duration_s": {
                            "type": ["number", "null"],
                            "description": "a video's length, in seconds; null for an image",
                        },
                        "sha256": {"type": "string", "description": "the SHA-256 of the bytes, hex"},
                        "download_url": {
                            "type": ["string", "null"],
                            "description": "asked for (`download_url=true`) and the outputs are in an "
                            "object store: a presigned URL of the store that fetches the bytes without "
                            "credentials until `download_expires_at`; null otherwise",
                        },
                        "download_expires_at": {
                            "type": ["string", "null"],
                            "format": "date-time",
                            "description": "when `download_url` stops working; null without one",
                        },
                    }
                ),
                "what it made: set once it succeeded; null otherwise, and once the output is deleted "
                "(see `output_deleted_at`)",
            ),
            "error": _nullable(
                _RENDER_ERROR,
                "why it failed, was cancelled or expired; null otherwise",
            ),
            "timings": _object(
                {f"{name}_ms": _described(_MS, f"milliseconds {_TIMINGS[name]}") for name in TIMINGS},
                description="where its time went, by phase; each null until its phase has happened",
            ),
            "attempts": {
                "type": "integer",
                "description": "how many times a worker has taken it (a transient failure, or a worker "
                "lost, puts it back in the queue for another attempt)",
            },
            "trace_id": {
                "type": ["string", "null"],
                "description": "the trace of the request that submitted it (null when tracing was off); "
                "its job's trace links to it",
            },
            "created_at": _described(_TIME, "when it was submitted"),
            "started_at": _described(
                _MAYBE_TIME, "when a worker started it (its latest attempt); null until one has"
            ),
            "finished_at": _described(_MAYBE_TIME, "when it ended (any final status); null until then"),
            "last_progress_at": _described(
                _MAYBE_TIME, "when its progress last rose (or it started); null until it has started"
            ),
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
            "backend": {
                "type": ["string", "null"],
                "description": "the backend that ran its latest attempt (`procedural`, `http`, `openai`); "
                "null before one started",
            },
            "provider_request_id": {
                "type": ["string", "null"],
                "description": "the provider's own id of that attempt's request (a prediction id, an API "
                "request id), to quote to the provider; null without one",
            },
            "webhook": _nullable(
                _object(
                    {
                        "url": {"type": "string", "description": "where its events are POSTed"},
                        "events": _WEBHOOK_EVENTS_SHOWN,
                    }
                ),
                "where its events are sent, as submitted (a retry keeps it); null: nowhere but to its "
                "project's webhook endpoints",
            ),
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
            "seq": {
                "type": "integer",
                "description": "its number among the render's events: 1, 2, ... (resume after it with "
                "Last-Event-ID)",
            },
            "type": {"enum": _EVENT_TYPES, "description": _EVENT_TYPE},
            "render_id": _described(ID, "the render it is about"),
            "at": _described(_TIME, "when it happened"),
            "progress": {
                "type": "number",
                "description": "in `progress` events (and `succeeded`: 1): the render's progress, from 0 "
                "to 1",
            },
            "phase": {
                "type": "string",
                "description": "in `phase` events: the phase that began (`image_fetch`, `generation`, "
                "`store`)",
            },
            "message": {
                "type": "string",
                "description": "details, for people: why it went back to the queue, what it continues from, "
                "what its reference was",
            },
            "error": {
                "type": "object",
                "description": "in `failed`, `cancelled` and `expired` events: why, as the render's `error` "
                "(`code`, `reason`, `message`, `retryable`)",
            },
        },
        ["seq", "type", "render_id", "at"],
    ),
    "ServerSentEvent": _object(
        {
            "event": {"enum": _EVENT_TYPES, "description": "the event's type (as its `data`'s `type`)"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": ref("RenderEvent"),
                "description": "the event, as JSON on one line",
            },
            "id": {
                "type": "string",
                "pattern": r"^[0-9]+(\.[0-9]+)*$",
                "description": "where to resume: the event's seq, or in a batch's stream each render's "
                "last seq in the batch's order, dot-separated",
            },
            "retry": {
                "type": "integer",
                "minimum": 0,
                "description": "milliseconds an EventSource waits before it reconnects (sent once, at the "
                "start: 1000)",
            },
        },
        ["event", "data"],
        description="One event of a text/event-stream, as a client reads it: `data` is a RenderEvent.",
    ),
    "CreateWebhookEndpointRequest": _object(
        {
            "url": _WEBHOOK_URL_INPUT,
            "events": _webhook_events("which events of the project's renders to send"),
            "description": _WEBHOOK_DESCRIPTION_INPUT,
        },
        ["url"],
    ),
    "UpdateWebhookEndpointRequest": _object(
        {
            "url": _WEBHOOK_URL_INPUT,
            "events": _webhook_events("which events of the project's renders to send", default=False),
            "description": _described(
                _text(MAX_WEBHOOK_DESCRIPTION, min_length=0), "what it is for, for people"
            ),
            "enabled": {
                "type": "boolean",
                "description": "`false` stops its deliveries (those due wait); `true` starts them again, "
                "also after it was disabled for failing, and clears `failing_since`",
            },
        },
        minProperties=1,
        error_message="must change url, events, description or enabled",
    ),
    "RotateWebhookSecretRequest": _object({"overlap_s": _OVERLAP_S}),
    "WebhookEndpoint": _object(
        {
            "id": _id("endpoint"),
            "project": _PROJECT,
            "url": {
                "type": "string",
                "description": "where the events of the project's renders are POSTed",
            },
            "events": _WEBHOOK_EVENTS_SHOWN,
            "description": {"type": "string", "description": "what it is for, for people (may be empty)"},
            "state": {
                "enum": ["enabled", "disabled"],
                "description": "`enabled`: it receives deliveries; `disabled`: by its owner, or after its "
                "deliveries failed without a break for 5 days by default (see `disabled_reason`); "
                "PATCH `enabled: true` starts it again",
            },
            "disabled_reason": {
                "type": ["string", "null"],
                "description": "why it is disabled (`disabled by its owner`, or since when its deliveries "
                "failed); null while it is enabled",
            },
            "failing_since": _described(
                _MAYBE_TIME, "while its deliveries fail: since the first failure after its last success"
            ),
            "created_at": _CREATED_AT,
            "secret": {
                "type": "string",
                "description": "its signing secret (`whsec_` and base64): only in the answer that created "
                "it; keep it then (POST .../webhooks/{id}:rotate-secret makes a new one)",
            },
        },
        [
            "id",
            "project",
            "url",
            "events",
            "description",
            "state",
            "disabled_reason",
            "failing_since",
            "created_at",
        ],
    ),
    "WebhookEndpointList": _object(
        {
            "webhooks": {
                "type": "array",
                "items": ref("WebhookEndpoint"),
                "description": "the project's webhook endpoints, oldest first, without their secrets",
            }
        },
        ["webhooks"],
    ),
    "Upload": _object(
        {
            "id": _id("upload"),
            "content_type": {
                "type": "string",
                "description": "its media type as its bytes decode (image/png, image/jpeg, image/webp, "
                "image/gif, image/bmp, image/tiff), whatever it was sent as",
            },
            "bytes": {"type": "integer", "description": "its size, in bytes"},
            "width": {"type": "integer", "description": "its width, in pixels"},
            "height": {"type": "integer", "description": "its height, in pixels"},
            "sha256": {"type": "string", "description": "the SHA-256 of the bytes, hex"},
            "created_at": _CREATED_AT,
            "expires_at": _described(
                _TIME, "when it is deleted (renders may name it until then; RENDERFLOW_UPLOAD_TTL_S)"
            ),
        },
        description="an image you uploaded, to serve as renders' reference",
    ),
    "WebhookSecret": _object(
        {
            "secret": {
                "type": "string",
                "description": "the signing secret (`whsec_` and base64), as the `standardwebhooks` "
                "libraries take it",
            },
            "previous_expires_at": _described(
                _MAYBE_TIME,
                "until when the secret it replaced still signs beside it; null when none does",
            ),
        },
        ["secret", "previous_expires_at"],
    ),
    "Delivery": _object(
        {
            "id": {
                **ID,
                "description": "the delivery's id: the `webhook-id` header of every attempt (the same on "
                "each, so that receivers can drop repeats)",
            },
            "render_id": _described(ID, "the render whose event it carries"),
            "endpoint_id": {
                "type": ["string", "null"],
                "description": "the project's endpoint it goes to; null: the render's own webhook",
            },
            "event": {"enum": WEBHOOK_EVENTS, "description": f"the event it carries: {_WEBHOOK_EVENT}"},
            "url": {"type": "string", "description": "where it is POSTed"},
            "state": {
                "enum": _DELIVERY_STATES,
                "description": "`pending` (to send, maybe again after a failed attempt), `delivered` (a "
                "2xx answered), or `failed` (given up: retried for 24 h by default, or its endpoint was "
                "deleted; it can still be redelivered)",
            },
            "attempts": {"type": "integer", "minimum": 0, "description": "how many attempts were made"},
            "created_at": _described(_TIME, "when its event happened"),
            "next_attempt_at": _described(
                _MAYBE_TIME, "while `pending`: when it is sent (again); null otherwise"
            ),
            "delivered_at": _described(_MAYBE_TIME, "when a receiver took it; null until then"),
            "attempt_log": {
                "type": "array",
                "items": _object(
                    {
                        "number": {"type": "integer", "description": "the attempt's number, from 1"},
                        "at": _described(_TIME, "when it was made"),
                        "outcome": {
                            "type": "string",
                            "description": "`delivered`, or why not: `timeout`, `connection_failed`, "
                            "`blocked_address`, `invalid_url`, `redirect_not_followed`, `http_<status>`, "
                            "`unavailable`, `render_gone`, `endpoint_deleted`",
                        },
                        "status": {
                            "type": ["integer", "null"],
                            "description": "the receiver's HTTP status; null when none answered",
                        },
                        "latency_ms": {
                            "type": "number",
                            "description": "milliseconds the attempt took, connecting included",
                        },
                        "message": {"type": "string", "description": "what happened, for people"},
                        "response_excerpt": {
                            "type": "string",
                            "description": "the start of the receiver's answer (empty: none)",
                        },
                    },
                    ["number", "at", "outcome", "status", "latency_ms", "message", "response_excerpt"],
                ),
                "description": "its attempts, oldest first",
            },
        },
        [
            "id",
            "render_id",
            "endpoint_id",
            "event",
            "url",
            "state",
            "attempts",
            "created_at",
            "next_attempt_at",
            "delivered_at",
            "attempt_log",
        ],
    ),
    "DeliveryList": _list_of("deliveries", "Delivery", "this page of the deliveries, newest first"),
    "ProjectList": _list_of("projects", "Project", "this page of your projects, oldest first"),
    "ChainList": _list_of("chains", "Chain", "this page of the project's chains, oldest first"),
    "RuleList": _list_of("rules", "Rule", "this page of the project's rules, oldest first"),
    "RenderList": _list_of(
        "renders", "Render", "this page of the renders: newest first, or for a chain in position order"
    ),
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
            "id": _id("batch"),
            "counts": _object(
                {
                    **{
                        name: _described(
                            {"type": "integer", "minimum": 0}, f"how many of its renders are `{name}`"
                        )
                        for name in STATUSES
                    },
                    "total": {"type": "integer", "minimum": 0, "description": "how many renders it has"},
                },
                [*STATUSES, "total"],
                description="how many of its renders are in each status, and in all",
            ),
            "renders": {
                "type": "array",
                "items": ref("Render"),
                "description": "its renders, in the order of the request's items",
            },
            "created_at": _described(_TIME, "when it was submitted"),
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
