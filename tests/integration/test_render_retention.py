"""Retention over HTTP, against the real services and a worker: an output past its retention is
deleted by the sweep (its file too) and its download answers 410; DELETE removes an ended render's
output at once; a request cannot ask for more than the maximum; records past the record retention
go, events and file with them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.integration.test_gateway_renders import read_events
from tests.integration.test_gateway_submits import quick_gateway_settings
from tests.support.gateway_stack import (
    LiveStack,
    assert_problem,
    eventually,
    procedural_worker,
    running_stack,
)

QUICK: dict[str, Any] = {"width": 64, "height": 64, "steps": 2}


@asynccontextmanager
async def _stack(database_url: str, tmp_path: Path, **generation: Any) -> AsyncIterator[LiveStack]:
    changes = {"retention_sweep_s": 0.1, "max_retention_s": 3600.0, **generation}
    worker = procedural_worker("retention-test", 20.0)
    async with running_stack(
        database_url, tmp_path, quick_gateway_settings(), worker, None, changes
    ) as stack:
        yield stack


async def _setup(stack: LiveStack) -> dict[str, str]:
    headers = await stack.user("hal")
    await stack.created("POST", "/v1/projects", headers, json={"slug": "art", "name": "Art"})
    return headers


async def _done(stack: LiveStack, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    """A render submitted and followed to its end; as it then is."""
    body = {"project": "art", "kind": "image", "prompt": "a fox", "params": QUICK, **fields}
    render = await stack.created("POST", "/v1/renders", headers, json=body)
    async with stack.http.get(f"{stack.base}/v1/renders/{render['id']}/events", headers=headers) as stream:
        await asyncio.wait_for(read_events(stream), 20)
    _, ended = await stack.call("GET", f"/v1/renders/{render['id']}", headers)
    return dict(ended)


def _file(tmp_path: Path, render_id: str) -> Path:
    return tmp_path / "artifacts" / render_id[:2] / render_id


async def test_an_output_past_its_retention_is_gone(database_url: str, tmp_path: Path) -> None:
    async with _stack(database_url, tmp_path) as stack:
        headers = await _setup(stack)
        kept = await _done(stack, headers)
        short = await _done(stack, headers, retention_s=0.3)
        assert short["status"] == "succeeded" and short["retention_s"] == 0.3
        expires = datetime.fromisoformat(short["output_expires_at"]) - datetime.fromisoformat(
            short["finished_at"]
        )
        assert abs(expires.total_seconds() - 0.3) < 0.01 and _file(tmp_path, short["id"]).exists()

        async def deleted() -> bool:
            _, render = await stack.call("GET", f"/v1/renders/{short['id']}", headers)
            return render["output_deleted_at"] is not None

        await eventually(deleted)
        _, gone = await stack.call("GET", f"/v1/renders/{short['id']}", headers)
        assert gone["output"] is None and gone["status"] == "succeeded"
        response, problem = await stack.call("GET", f"/v1/renders/{short['id']}/output", headers)
        assert_problem(response, problem, 410, "gone")
        assert not _file(tmp_path, short["id"]).exists()
        # Without a retention asked for, and none by default: kept.
        response, _ = await stack.call("GET", f"/v1/renders/{kept['id']}/output", headers)
        assert response.status == 200 and kept["retention_s"] is None and kept["output_expires_at"] is None


async def test_delete_removes_an_ended_renders_output_at_once(database_url: str, tmp_path: Path) -> None:
    async with _stack(database_url, tmp_path) as stack:
        headers = await _setup(stack)
        done = await _done(stack, headers)
        running = await stack.created(
            "POST", "/v1/renders", headers, json={"project": "art", "kind": "image", "prompt": "slow",
                                                   "params": {**QUICK, "steps": 150}},
        )  # fmt: skip

        response, problem = await stack.call("DELETE", f"/v1/renders/{running['id']}", headers)
        assert_problem(response, problem, 409, "conflict")
        response, deleted = await stack.call("DELETE", f"/v1/renders/{done['id']}", headers)
        assert response.status == 200 and deleted["output"] is None and deleted["output_deleted_at"]
        assert not _file(tmp_path, done["id"]).exists()
        response, problem = await stack.call("GET", f"/v1/renders/{done['id']}/output", headers)
        assert_problem(response, problem, 410, "gone")
        again, same = await stack.call("DELETE", f"/v1/renders/{done['id']}", headers)
        assert again.status == 200 and same["output_deleted_at"] == deleted["output_deleted_at"]
        await stack.call("POST", f"/v1/renders/{running['id']}:cancel", headers)


async def test_a_default_retention_applies_and_a_request_cannot_ask_past_the_maximum(
    database_url: str, tmp_path: Path
) -> None:
    async with _stack(database_url, tmp_path, output_retention_s=600.0, max_retention_s=3600.0) as stack:
        headers = await _setup(stack)
        body = {"project": "art", "kind": "image", "prompt": "a fox", "retention_s": 7200}
        response, problem = await stack.call("POST", "/v1/renders", headers, json=body)
        assert_problem(response, problem, 422, "validation_failed")
        assert [e["field"] for e in problem["errors"]] == ["retention_s"]
        done = await _done(stack, headers)
        assert done["retention_s"] == 600.0


async def test_records_past_their_retention_go_with_their_file(database_url: str, tmp_path: Path) -> None:
    async with _stack(database_url, tmp_path, record_retention_s=0.5) as stack:
        headers = await _setup(stack)
        done = await _done(stack, headers)
        assert _file(tmp_path, done["id"]).exists()

        async def forgotten() -> bool:
            response, _ = await stack.call("GET", f"/v1/renders/{done['id']}", headers)
            return response.status == 404

        await eventually(forgotten)
        assert not _file(tmp_path, done["id"]).exists()
        _, listed = await stack.call("GET", "/v1/renders", headers)
        assert listed["renders"] == []
