"""The OpenAPI document is complete: every route the gateway serves is an operation (and nothing
else is), each documents the errors it can give as problem+json with their headers, the submit
routes document their rate limits, every property and parameter says what it means, and a problem's
`code` lists every code a client can receive."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import problems
from gateway.app import create_app
from gateway.config import Settings
from gateway.conventions import ERROR_CODES, SUBMIT_ROUTES
from gateway.openapi import SPEC
from gateway.routes import docs
from gateway.validation import validate
from shared.errors import ERROR_TYPES, RenderflowError, ValidationFailed

OPERATIONS = [
    (method.upper(), path, operation)
    for path, operations in SPEC["paths"].items()
    for method, operation in operations.items()
]


def _resolve(item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        kind, name = item["$ref"].removeprefix("#/components/").split("/")
        item = SPEC["components"][kind][name]
    return item


def test_every_route_is_an_operation_and_every_operation_a_route() -> None:
    app = create_app(Settings())
    # aiohttp answers HEAD for every GET itself (same headers, no body): not operations of their own.
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    # Nor is the page that shows this document to people (/docs and its assets) part of the API.
    routes = {(method, path) for method, path in routes if not path.startswith(docs.PAGE)}
    assert routes == {(method, path) for method, path, _ in OPERATIONS}


def test_operation_ids_are_unique() -> None:
    ids = [operation["operationId"] for _, _, operation in OPERATIONS]
    assert len(ids) == len(set(ids))


def test_errors_are_documented_as_problems_with_their_headers() -> None:
    for method, path, operation in OPERATIONS:
        responses = operation["responses"]
        public = operation.get("security") == []
        expected = {"400", "500"} | (set() if public else {"401", "404", "422", "429", "503", "504"})
        if "requestBody" in operation:
            expected |= {"408", "413"}
        assert expected <= responses.keys(), (method, path)
        for status in expected - {"400"}:
            response = _resolve(responses[status])
            assert "application/problem+json" in response["content"], (method, path, status)
            assert "X-Request-Id" in response["headers"], (method, path, status)
        if not public:
            assert "WWW-Authenticate" in _resolve(responses["401"])["headers"]
            assert "Retry-After" in _resolve(responses["429"])["headers"]
            assert "Retry-After" in _resolve(responses["503"])["headers"]


def test_submit_routes_document_their_rate_limits() -> None:
    assert {(m, p) for m, p, _ in OPERATIONS} >= SUBMIT_ROUTES
    for method, path, operation in OPERATIONS:
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                headers = _resolve(response).get("headers", {})
                limited = (method, path) in SUBMIT_ROUTES
                assert ("RateLimit-Remaining" in headers) == limited, (method, path, status)
    assert "RateLimit-Remaining" in SPEC["components"]["responses"]["TooManyRequests"]["headers"]


def test_the_api_key_is_a_bearer_token() -> None:
    assert SPEC["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key",
    }
    assert SPEC["security"] == [{"apiKey": []}]


def test_text_fields_refuse_nul_characters() -> None:
    # PostgreSQL text cannot hold NUL: refused here as a 422, instead of failing in a service.
    document = {"project": "p1", "kind": "image", "prompt": "a\x00b", "reference": {"url": "http://h/\x00"}}
    with pytest.raises(ValidationFailed) as refused:
        validate(document, "RenderRequest")
    assert {(e.field, e.message) for e in refused.value.errors} == {
        ("prompt", "must not contain NUL characters"),
        ("reference.url", "must be an http or https URL, without NUL characters"),
    }


def _undescribed(schema: Any, where: str) -> list[str]:
    """The properties under `schema` (in nested objects, array items and anyOf/oneOf/allOf branches
    too) without a description, by their path; a property that only names another component is
    described there."""
    if not isinstance(schema, dict):
        return []
    found: list[str] = []
    for name, prop in (schema.get("properties") or {}).items():
        path = f"{where}.{name}"
        if set(prop) != {"$ref"} and not prop.get("description"):
            found.append(path)
        found += _undescribed(prop, path)
    if "items" in schema:
        found += _undescribed(schema["items"], f"{where}[]")
    for keyword in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(keyword, []):
            found += _undescribed(branch, where)
    return found


def test_every_property_and_parameter_is_described() -> None:
    undescribed = [
        path for name, schema in SPEC["components"]["schemas"].items() for path in _undescribed(schema, name)
    ]
    for method, path, operation in OPERATIONS:
        for parameter in map(_resolve, operation.get("parameters", [])):
            if not parameter.get("description"):
                undescribed.append(f"{method} {path} {parameter['in']} parameter {parameter['name']}")
    assert not undescribed, "without a description: " + ", ".join(undescribed)


def test_the_problem_code_lists_every_code_a_client_can_receive() -> None:
    own = [
        value
        for value in vars(problems).values()
        if isinstance(value, type)
        and issubclass(value, RenderflowError)
        and value.__module__ == problems.__name__
    ]
    statuses: dict[str, set[int]] = {}
    for error in [*ERROR_TYPES, *own]:
        statuses.setdefault(error.code, set()).add(error.http_status)
    code = SPEC["components"]["schemas"]["Problem"]["properties"]["code"]
    assert sorted(code["enum"]) == sorted(statuses)
    assert {name: set(listed) for name, (listed, _) in ERROR_CODES.items()} == statuses
    for name, listed in statuses.items():
        assert f"- `{name}` ({', '.join(map(str, sorted(listed)))}): " in code["description"], name
