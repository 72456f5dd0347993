"""Failures become problem+json documents with the right status, code, headers and field errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.app import create_app
from gateway.config import Settings
from gateway.problems import (
    PROBLEM_CONTENT_TYPE,
    problem_body,
    problem_middleware,
    problem_response,
    request_id_of,
)
from shared.errors import (
    FieldError,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RenderflowError,
    Unauthenticated,
    Unavailable,
    ValidationFailed,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(response: web.Response) -> dict[str, object]:
    assert response.body is not None
    body: dict[str, object] = json.loads(bytes(response.body))  # type: ignore[arg-type]
    return body


def test_problem_has_every_member_and_field_errors() -> None:
    error = ValidationFailed("bad", [FieldError("params.width", "must be at most 2048")])
    body = problem_body(error, "req-1", "ab" * 16)
    assert body == {
        "type": "https://renderflow.dev/problems/validation_failed",
        "title": "Validation failed",
        "status": 422,
        "detail": "bad",
        "code": "validation_failed",
        "request_id": "req-1",
        "trace_id": "ab" * 16,
        "errors": [{"field": "params.width", "message": "must be at most 2048"}],
    }


def test_problem_without_field_errors_has_no_errors_member() -> None:
    assert "errors" not in problem_body(NotFound("no such render"), "r", None)


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (RateLimited(retry_after=2.5), 429, "3"),
        (QuotaExceeded(retry_after=0.1), 429, "1"),
        (Unavailable(retry_after=7), 503, "7"),
    ],
)
def test_throttling_and_unavailability_say_when_to_retry(
    error: RenderflowError, status: int, retry_after: str
) -> None:
    response = problem_response(error, "r", None)
    assert response.status == status
    assert response.headers["Retry-After"] == retry_after
    assert response.content_type == PROBLEM_CONTENT_TYPE
    assert _json(response)["code"] == error.code


def test_unauthenticated_asks_for_a_bearer_token() -> None:
    response = problem_response(Unauthenticated(), "r", None)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id\n", False),
        ("", False),
        (None, False),
    ],
)
def test_request_id_is_kept_only_when_sane(incoming: str | None, kept: bool) -> None:
    assert (request_id_of(incoming) == incoming) is kept


async def _through_middleware(
    handler: Handler, method: str = "GET", headers: dict[str, str] | None = None
) -> web.Response:
    app = create_app(Settings())
    request = make_mocked_request(method, "/v1/renders/x", headers=headers or {}, app=app)
    response = await problem_middleware(request, handler)
    assert isinstance(response, web.Response)
    return response


async def test_an_unexpected_exception_is_a_logged_500_without_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise KeyError("secret internals")

    with caplog.at_level(logging.ERROR, logger="gateway.problems"):
        response = await _through_middleware(broken, headers={"X-Request-Id": "req-42"})
    body = _json(response)
    assert response.status == 500
    assert body["code"] == "internal" and body["request_id"] == "req-42"
    assert "secret internals" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    assert any(record.exc_info for record in caplog.records)


async def test_domain_errors_keep_their_status_and_code() -> None:
    async def missing(request: web.Request) -> web.Response:
        raise NotFound("No such render.")

    response = await _through_middleware(missing)
    assert response.status == 404
    assert _json(response)["detail"] == "No such render."


async def test_aiohttp_errors_become_problems_too() -> None:
    async def wrong_method(request: web.Request) -> web.Response:
        raise web.HTTPMethodNotAllowed("DELETE", ["GET", "POST"])

    async def too_large(request: web.Request) -> web.Response:
        raise web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)

    response = await _through_middleware(wrong_method, "DELETE")
    assert response.status == 405 and response.headers["Allow"] == "GET, POST"
    assert _json(response)["code"] == "method_not_allowed"
    response = await _through_middleware(too_large, "POST")
    assert response.status == 413 and _json(response)["code"] == "payload_too_large"
