"""Lists that help and small truths, over HTTP against the real services and a worker: renders
filtered by status, kind, batch and creation time, in a stable order across pages; HEAD and
Content-Disposition on outputs; a batch named `id` like everything else; an empty Idempotency-Key
refused; the API's root the same with or without its slash."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import quick_gateway_settings
from tests.support.gateway_stack import LiveStack, StartWorker, assert_problem, procedural_worker

QUICK: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def stack_worker() -> StartWorker:
    return procedural_worker("lists-test", 1.0, concurrency=4)


@pytest.fixture
def gateway_settings() -> Any:
    return quick_gateway_settings()


async def _setup(stack: LiveStack) -> dict[str, str]:
    headers = await stack.user("fay")
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    return headers


def _request(**fields: Any) -> dict[str, Any]:
    return {"project": "art", "kind": "image", "prompt": "a fox", "params": QUICK, **fields}


async def _ended(stack: LiveStack, headers: dict[str, str], render_id: str) -> str:
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}/events", headers=headers) as stream:
        seen = await asyncio.wait_for(read_events(stream), 20)
    return str(seen.events[-1]["type"])


async def _ids(stack: LiveStack, headers: dict[str, str], query: str) -> list[str]:
    """Every render the list gives for `query`, page after page (two at a time)."""
    ids: list[str] = []
    token = ""
    while True:
        path = f"/v1/renders?page_size=2&{query}" + (f"&page_token={token}" if token else "")
        response, page = await stack.call("GET", path, headers)
        assert response.status == 200, page
        ids += [render["id"] for render in page["renders"]]
        if not (token := page["next_page_token"]):
            return ids


async def test_lists_filter_by_status_kind_batch_and_creation_time(stack: LiveStack) -> None:
    headers = await _setup(stack)
    image = await stack.created("POST", "/v1/renders", headers, json=_request())
    video = await stack.created(
        "POST",
        "/v1/renders",
        headers,
        json=_request(kind="video", params={**QUICK, "duration_s": 0.5, "fps": 2}),
    )
    batch = await stack.created("POST", "/v1/renders:batch", headers, json={"items": [_request()] * 3})
    in_batch = [render["id"] for render in batch["renders"]]
    for render_id in [image["id"], video["id"], *in_batch]:
        assert await _ended(stack, headers, render_id) == "succeeded"
    cancelled = await stack.created(
        "POST", "/v1/renders", headers, json=_request(params={**QUICK, "steps": 150})
    )
    await stack.call("POST", f"/v1/renders/{cancelled['id']}:cancel", headers)
    assert await _ended(stack, headers, cancelled["id"]) == "cancelled"

    newest_first = [cancelled["id"], *reversed(in_batch), video["id"], image["id"]]
    assert await _ids(stack, headers, "") == newest_first
    assert await _ids(stack, headers, "kind=video") == [video["id"]]
    assert await _ids(stack, headers, "status=cancelled") == [cancelled["id"]]
    assert await _ids(stack, headers, "kind=image&status=succeeded") == [*reversed(in_batch), image["id"]]
    assert await _ids(stack, headers, f"batch_id={batch['id']}") == list(reversed(in_batch))
    after = quote(video["created_at"])
    assert await _ids(stack, headers, f"created_after={after}") == newest_first[:-1]
    assert await _ids(stack, headers, f"created_before={after}") == [image["id"]]
    window = f"created_after={quote(batch['renders'][0]['created_at'])}&created_before={after}"
    assert await _ids(stack, headers, window) == []
    for query, field in [
        ("batch_id=not-a-batch", "batch_id"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2030-01-01T00:00:00", "created_before"),
        ("kind=sculpture", "kind"),
    ]:
        response, problem = await stack.call("GET", f"/v1/renders?{query}", headers)
        assert_problem(response, problem, 422, "validation_failed")
        assert [e["field"] for e in problem["errors"]] == [field], query


async def test_an_outputs_head_is_its_gets_headers_and_it_has_a_file_name(stack: LiveStack) -> None:
    headers = await _setup(stack)
    render = await stack.created("POST", "/v1/renders", headers, json=_request())
    assert await _ended(stack, headers, render["id"]) == "succeeded"
    url = f"{stack.base}/v1/renders/{render['id']}/output"

    async with stack.http.get(url, headers=headers) as got:
        body = await got.read()
    async with stack.http.head(url, headers=headers) as head:
        assert head.status == 200 and await head.read() == b""
    async with stack.http.head(url, headers={**headers, "Range": "bytes=0-9"}) as part:
        assert part.status == 206 and part.headers["Content-Length"] == "10"

    assert got.headers["Content-Disposition"] == f'inline; filename="{render["id"]}.png"'
    for name in ("Content-Type", "ETag", "Accept-Ranges", "Cache-Control", "Content-Disposition"):
        assert head.headers[name] == got.headers[name], name
    assert int(head.headers["Content-Length"]) == len(body) == int(got.headers["Content-Length"])
    assert part.headers["Content-Range"] == f"bytes 0-9/{len(body)}"


async def test_small_truths(stack: LiveStack) -> None:
    headers = await _setup(stack)
    # A batch is `id`, like every other resource (and `batch_id` still, for earlier clients).
    batch = await stack.created("POST", "/v1/renders:batch", headers, json={"items": [_request()]})
    assert batch["id"] == batch["batch_id"] and batch["renders"][0]["batch_id"] == batch["id"]
    # An empty Idempotency-Key is a mistake, not "no key".
    response, problem = await stack.call(
        "POST", "/v1/renders", {**headers, "Idempotency-Key": ""}, json=_request()
    )
    assert_problem(response, problem, 422, "validation_failed")
    assert [e["field"] for e in problem["errors"]] == ["Idempotency-Key"]
    # The API's root, with or without its slash, needs a key and says whose it is.
    roots = [await stack.call("GET", path, headers) for path in ("/v1", "/v1/")]
    assert [(r.status, body) for r, body in roots] == [(200, roots[0][1])] * 2
    assert roots[0][1]["docs"] == "/docs" and roots[0][1]["user_id"]
    for path in ("/v1", "/v1/"):
        response, problem = await stack.call("GET", path)
        assert_problem(response, problem, 401, "unauthenticated")
    assert datetime.fromisoformat(batch["renders"][0]["created_at"]).tzinfo is not None
