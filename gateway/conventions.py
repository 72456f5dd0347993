"""What the operations of the HTTP API have in common, in one place for the OpenAPI document and the
middleware that implements it: the error responses each operation can give (problem+json, with
their headers), and the submit routes that the rate limits guard (with the RateLimit-* fields)."""

from __future__ import annotations

from typing import Any

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
