"""What became of a render's reference, told on the render over HTTP: used or not and the typed
reason, the render it was read from (a chain's predecessor), a failure when it was required; and
the fetch failure as warnings of the worker and of imagefetch, on the render's trace. Real gateway,
metadata, imagefetch, generation and worker in this process, a real origin on loopback."""

from __future__ import annotations

import json
from typing import Any

from tests.support.observed_stack import ObservedStack, job_id


async def _render(stack: ObservedStack, render_id: str) -> dict[str, Any]:
    await stack.finished(render_id)
    async with stack.http.get(f"{stack.base}/v1/renders/{render_id}", headers=stack.headers) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def _warnings(stack: ObservedStack, message: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stack.logs.getvalue().splitlines()]
    return [line for line in lines if line["level"] == "warning" and line["message"] == message]


async def test_an_unusable_optional_reference_is_said_on_the_render_and_warned_on_its_trace(
    observed: ObservedStack,
) -> None:
    missing = observed.origin.url("/status/404")
    status, submitted = await observed.submit(prompt="a fox", reference={"url": missing})
    assert status == 202

    render = await _render(observed, submitted["id"])

    assert render["status"] == "succeeded" and render["error"] is None
    reference = render["reference"]
    assert reference["url"] == missing and reference["required"] is False
    assert (reference["used"], reference["reason"]) == (False, "http_404")
    assert reference["message"] and reference["source_render_id"] is None
    [job] = [s for s in observed.recorder.spans if s.name == "render" and job_id(s) == render["id"]]
    trace_id = format(job.context.trace_id, "032x")
    [worker] = _warnings(observed, "reference not used")
    assert worker["render_id"] == render["id"] and worker["host"] == "127.0.0.1"
    assert (worker["reason"], worker["trace_id"]) == ("http_404", trace_id)
    [fetcher] = _warnings(observed, "fetch failed")
    assert (fetcher["host"], fetcher["reason"], fetcher["trace_id"]) == ("127.0.0.1", "http_404", trace_id)


async def test_a_blocked_required_reference_fails_the_render_with_the_reason(observed: ObservedStack) -> None:
    # ::1 is loopback, which only 127.0.0.1's allow-listing lets through: refused before any connection.
    blocked = f"http://[::1]:{observed.origin.port}/image/blocked"
    _, submitted = await observed.submit(prompt="a fox", reference={"url": blocked, "required": True})

    render = await _render(observed, submitted["id"])

    assert render["status"] == "failed"
    error = render["error"]
    assert (error["code"], error["reason"]) == ("reference_fetch_failed", "blocked_address")
    assert (render["reference"]["used"], render["reference"]["reason"]) == (False, "blocked_address")
    assert observed.origin.requests == 0
    [warning] = _warnings(observed, "reference failed; the render fails")
    assert (warning["render_id"], warning["reason"]) == (render["id"], "blocked_address")


async def test_a_used_reference_names_the_render_it_came_from(observed: ObservedStack) -> None:
    _, queued = await observed.submit(prompt="before")
    _, fetched = await observed.submit(prompt="fetched", reference={"url": observed.origin.url("/image/ok")})
    first = await _render(observed, queued["id"])
    assert first["reference"] is None  # no reference asked, nothing to tell
    _, after = await observed.submit(prompt="after", reference={"render_id": first["id"]})

    by_url, by_render = await _render(observed, fetched["id"]), await _render(observed, after["id"])

    assert by_url["reference"]["used"] is True and by_url["reference"]["reason"] is None
    assert by_url["reference"]["source_render_id"] is None
    assert by_render["reference"] | {"required": False} == {
        "render_id": first["id"],
        "required": False,
        "used": True,
        "reason": None,
        "message": None,
        "source_render_id": first["id"],
    }


async def test_a_chain_render_names_the_render_it_continued_from(observed: ObservedStack) -> None:
    async with observed.http.get(f"{observed.base}/v1/projects/obs", headers=observed.headers) as r:
        chain = (await r.json())["default_chain_id"]
    path = f"{observed.base}/v1/projects/obs/chains/{chain}/renders"
    ids = []
    for prompt in ("one", "two"):
        body = {"kind": "image", "prompt": prompt, "params": {"width": 64, "height": 64, "steps": 2}}
        async with observed.http.post(path, headers=observed.headers, json=body) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])

    first, second = await _render(observed, ids[0]), await _render(observed, ids[1])

    assert first["reference"] is None  # the first of a chain has nothing to continue from
    assert second["reference"]["previous"] is True and second["reference"]["used"] is True
    assert second["reference"]["source_render_id"] == first["id"]
