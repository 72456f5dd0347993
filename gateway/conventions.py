"""What the operations of the HTTP API have in common, in one place for the OpenAPI document and the
middleware that implements it: the error responses each operation can give (problem+json, with
their headers, and every code they carry), and the submit routes that the rate limits guard (with
the RateLimit-* fields)."""

from __future__ import annotations

from typing import Any

from shared.errors import ERROR_TYPES, RenderflowError

Schema = dict[str, Any]

SUBMIT_ROUTES = frozenset(
    {
        ("POST", "/v1/renders"),
        ("POST", "/v1/renders:batch"),
        ("POST", "/v1/projects/{slug}/chains/{chain_id}/renders"),
        ("POST", "/render"),
        ("POST", "/project/{slug}/chain/{chain_id}"),
    }
)
"""(method, route) of every route that queues renders: the ones the rate limits guard."""
CLIENT_CLOSED = 499
"""The status recorded when the client went away before the answer (nginx's convention)."""
BATCH_ROUTES = frozenset({("POST", "/v1/renders:batch")})
"""Submit routes whose body is `{items: [...]}`: each item costs a token."""


def _header(schema: Schema, description: str, *, required: bool = False) -> Schema:
    return {"schema": schema, "description": description, "required": required}


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


HEADERS: dict[str, Schema] = {
    "RequestId": _header(
        {"type": "string", "minLength": 1},
        "the request's id (the client's X-Request-Id when sane)",
        required=True,
    ),
    "RetryAfter": _header(
        {"type": "integer", "minimum": 1}, "seconds to wait before trying again", required=True
    ),
    "WWWAuthenticate": _header({"type": "string"}, '`Bearer realm="renderflow"`', required=True),
    "RateLimitLimit": _header(
        {"type": "integer", "minimum": 1}, "the API key's submit bucket: its capacity (the burst)"
    ),
    "RateLimitRemaining": _header({"type": "integer", "minimum": 0}, "tokens left after this request"),
    "RateLimitReset": _header({"type": "integer", "minimum": 0}, "seconds until the bucket is full again"),
}
"""Response headers, as OpenAPI `components.headers`."""

RATE_LIMIT_HEADERS = {
    f"RateLimit-{name}": _ref("headers", f"RateLimit{name}") for name in ("Limit", "Remaining", "Reset")
}
"""On every response of a submit route while rate limits are on."""


def _problem(description: str, headers: dict[str, Schema] | None = None, *, plain: bool = False) -> Schema:
    # `plain`: aiohttp's HTTP parser may answer before the application (and its request id) runs.
    content: Schema = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    request_id = {"X-Request-Id": _ref("headers", "RequestId")}
    if plain:
        content["text/plain"] = {"schema": {"type": "string"}}
        request_id = {}
    return {"description": description, "headers": {**request_id, **(headers or {})}, "content": content}


_RETRY = {"Retry-After": _ref("headers", "RetryAfter")}
RESPONSES: dict[str, Schema] = {
    "Problem": _problem("an error"),
    "BadRequest": _problem(
        "the request cannot be read; a request line or header too long for the HTTP parser is "
        "answered in text/plain, without X-Request-Id",
        plain=True,
    ),
    "Unauthenticated": _problem("no valid API key", {"WWW-Authenticate": _ref("headers", "WWWAuthenticate")}),
    "TooManyRequests": _problem(
        "`rate_limited` (the API key's submit bucket is empty) or `quota_exceeded` (too many renders "
        "queued or running, or event streams open)",
        {**_RETRY, **RATE_LIMIT_HEADERS},
    ),
    "Unavailable": _problem("a service behind the gateway is unavailable or too slow", _RETRY),
}
"""Error responses, as OpenAPI `components.responses`."""


GATEWAY_ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (
        400,
        "the request cannot be understood, e.g. a plain request to a `/ws` route (a request line or "
        "header too long for the HTTP parser is answered in text/plain, without a problem document)",
    ),
    "method_not_allowed": (405, "the path does not support the method; `Allow` lists those it does"),
    "range_not_satisfiable": (
        416,
        "a `Range` that starts past the end of the output; `Content-Range: bytes */<size>` gives its size",
    ),
}
"""The codes of the gateway's own errors (the classes of gateway/problems.py), with their status and
when they happen. Written out rather than read from the classes: gateway.problems imports the
tracing middleware, which reads the OpenAPI document, so this module may not import it; a unit test
keeps the two in step."""

_WHEN: dict[str, str] = {
    "internal": "a fault of Renderflow, logged with the trace id (no stack trace is shown)",
    "unauthenticated": "no `Authorization`, not `Bearer <key>`, or an unknown or revoked API key",
    "not_found": "no such route; or the project, chain, rule, render, batch, webhook endpoint or delivery "
    "does not exist or is another user's (the two look the same); or a submit names an unknown project, "
    "or a chain not of the project",
    "gone": "the render's output has been deleted (by `DELETE /v1/renders/{id}`, or past its retention)",
    "conflict": "the project's slug is taken; the render is not in a state that allows this (cancelling "
    "one that succeeded or failed, changing the priority of one that has started, retrying one that is "
    "not failed, cancelled or expired, deleting the output of one that has not ended, downloading the "
    "output of one that has not succeeded); or a submit raced an identical one being written (try "
    "again)",
    "payload_too_large": "the body is over RENDERFLOW_GATEWAY_MAX_BODY_BYTES (default 1 MiB)",
    "request_timeout": "the body did not fully arrive within RENDERFLOW_GATEWAY_BODY_TIMEOUT_S (default "
    "30 s) of the head; the connection is closed",
    "validation_failed": "the body, a query parameter or a header is invalid (see `errors`): also a reused "
    "Idempotency-Key with another body, a batch larger than the rate limit's burst, a batch item naming "
    "an unknown project or chain, a webhook URL not on a public address, a malformed stream cursor or "
    "page token",
    "rate_limited": "the API key's submit bucket is empty; retry after `Retry-After` (`RateLimit-*` say "
    "more)",
    "quota_exceeded": "too many renders queued or running, or event streams open; retry after `Retry-After`",
    "unavailable": "a service behind the gateway is unavailable, or `/readyz` found one not serving (503), "
    "or one did not answer within the gateway's deadline (504); retry after `Retry-After`",
}
"""When a client receives each code of `shared.errors` (a code missing here is explained by its class's
docstring)."""


def _when(error: type[RenderflowError]) -> str:
    if error.code in _WHEN:
        return _WHEN[error.code]
    said = (error.__doc__ or error.title).strip().rstrip(".")
    return said[:1].lower() + said[1:]


def _error_codes() -> dict[str, tuple[list[int], str]]:
    statuses: dict[str, set[int]] = {code: {status} for code, (status, _) in GATEWAY_ERRORS.items()}
    when = {code: text for code, (_, text) in GATEWAY_ERRORS.items()}
    for error in ERROR_TYPES:
        statuses.setdefault(error.code, set()).add(error.http_status)
        when.setdefault(error.code, _when(error))
    ordered = sorted(statuses, key=lambda code: (min(statuses[code]), code))
    return {code: (sorted(statuses[code]), when[code]) for code in ordered}


ERROR_CODES = _error_codes()
"""Every `code` a problem document can carry (`shared.errors.ERROR_TYPES` and the gateway's own), in
the order of their statuses: the HTTP statuses each comes with, and when."""

PROBLEM_CODE: Schema = {
    "type": "string",
    "enum": list(ERROR_CODES),
    "description": "the stable, machine-readable error code, to branch on (`type` ends with it); with its "
    "status:\n\n"
    + "\n".join(
        f"- `{code}` ({', '.join(map(str, statuses))}): {when}"
        for code, (statuses, when) in ERROR_CODES.items()
    ),
}
"""The `code` member of the Problem schema."""


def problem_responses(method: str, *, public: bool, has_body: bool) -> dict[str, Schema]:
    """The error responses an operation can give, by status."""
    found = {"400": "BadRequest", "500": "Problem"}
    if not public:
        found |= {
            "401": "Unauthenticated",
            "404": "Problem",
            "422": "Problem",
            "429": "TooManyRequests",
            "503": "Unavailable",
            "504": "Unavailable",
        }
        if method.lower() in ("post", "put", "patch", "delete"):
            found["409"] = "Problem"
    if has_body:
        found |= {"408": "Problem", "413": "Problem"}  # a body too slow to arrive, or too large
    return {status: _ref("responses", name) for status, name in sorted(found.items())}


def with_conventions(paths: dict[str, dict[str, Schema]]) -> dict[str, dict[str, Schema]]:
    """`paths` with every operation's error responses (those it documents itself win), and the
    RateLimit-* fields on the successful responses of the submit routes."""
    completed: dict[str, dict[str, Schema]] = {}
    for path, operations in paths.items():
        completed[path] = {}
        for method, operation in operations.items():
            responses = {
                **problem_responses(
                    method, public=operation.get("security") == [], has_body="requestBody" in operation
                ),
                **operation["responses"],
            }
            if (method.upper(), path) in SUBMIT_ROUTES:
                responses = {
                    status: {**response, "headers": {**response.get("headers", {}), **RATE_LIMIT_HEADERS}}
                    if status.startswith("2")
                    else response
                    for status, response in responses.items()
                }
            completed[path][method] = {**operation, "responses": dict(sorted(responses.items()))}
    return completed
