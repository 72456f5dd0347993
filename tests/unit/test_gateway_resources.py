"""Protobuf answers become the JSON resources of the contract; byte ranges and ETags are read right."""

from __future__ import annotations

import re

import pytest
from google.protobuf import timestamp_pb2
from renderflow.v1 import generation_pb2, metadata_pb2

from gateway.auth import bearer_key
from gateway.config import Settings
from gateway.problems import RangeNotSatisfiable
from gateway.resources import page, rule_json
from gateway.routes.output import etag_matches, parse_range
from shared.errors import Unauthenticated
from shared.render_json import event_json, render_json
from shared.settings import ConfigError, Env
from tests.support import TOKEN_ENV

_RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=500_000_000)


def test_a_queued_render_as_json() -> None:
    render = generation_pb2.Render(
        id="r1",
        project="demo",
        chain_id="c1",
        position=3,
        kind=generation_pb2.RENDER_KIND_IMAGE,
        status=generation_pb2.RENDER_STATUS_QUEUED,
        queue_position=0,
        prompt="fox",
        params=generation_pb2.RenderParams(width=64, height=32, steps=2, seed=9),
        rules=[metadata_pb2.RuleSnapshot(id="u1", text="no text")],
        reference=generation_pb2.Reference(url="https://example.com/a.png"),
        timings=generation_pb2.Timings(auth_ms=1.5, db_ms=0.0),
        created_at=_at(1_700_000_000),
    )
    body = render_json(render)
    assert body["status"] == "queued" and body["kind"] == "image"
    assert body["queue_position"] == 0 and body["eta_s"] is None
    assert body["params"] == {
        "width": 64,
        "height": 32,
        "steps": 2,
        "seed": 9,
        "duration_s": None,
        "fps": None,
        "workflow": None,
    }
    assert body["rules"] == [{"id": "u1", "text": "no text"}]
    assert body["reference"] == {
        "url": "https://example.com/a.png",
        "required": False,
        "used": None,  # not run yet
        "reason": None,
        "message": None,
        "source_render_id": None,
    }
    assert body["stalled"] is False and body["waiting_on"] is None
    assert body["output"] is None and body["error"] is None
    assert body["negative_prompt"] is None and body["batch_id"] is None
    assert body["timings"]["auth_ms"] == 1.5 and body["timings"]["db_ms"] == 0.0
    assert body["timings"]["queue_wait_ms"] is None
    assert _RFC3339_UTC.fullmatch(body["created_at"]) and body["started_at"] is None


def test_a_finished_render_has_its_output_and_a_failed_one_its_error() -> None:
    done = render_json(
        generation_pb2.Render(
            id="r2",
            status=generation_pb2.RENDER_STATUS_SUCCEEDED,
            output=generation_pb2.RenderOutput(content_type="image/png", bytes=10, width=4, height=4),
        )
    )
    assert done["output"]["url"] == "/v1/renders/r2/output" and done["output"]["bytes"] == 10
    failed = render_json(
        generation_pb2.Render(
            status=generation_pb2.RENDER_STATUS_FAILED,
            error=generation_pb2.RenderError(code="reference_fetch_failed", reason="timeout"),
        )
    )
    assert failed["error"] == {
        "code": "reference_fetch_failed",
        "reason": "timeout",
        "message": "",
        "retryable": False,
    }


def test_events_carry_only_what_they_have() -> None:
    queued = generation_pb2.RenderEvent(seq=1, type="queued", render_id="r", at=_at(0))
    assert set(event_json(queued)) == {"seq", "type", "render_id", "at"}
    progress = generation_pb2.RenderEvent(seq=2, type="progress", render_id="r", at=_at(0), progress=0.0)
    assert event_json(progress)["progress"] == 0.0


def test_lists_and_project_wide_rules() -> None:
    assert page("rules", [], "") == {"rules": [], "next_page_token": None}
    assert rule_json(metadata_pb2.Rule(id="u", text="t", active=True))["chain_id"] is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=50-1000", (50, 99)),
        ("bytes=0-1,5-6", None),
        ("bytes=9-3", None),
        ("items=0-3", None),
        ("bytes=x-3", None),
        # Not ASCII digits, or more of them than int() reads: ignored, or past every output.
        ("bytes=\u00b3-5", None),
        ("bytes=0-\u0663", None),
        ("bytes=0-" + "9" * 5000, (0, 99)),
        ("bytes=-" + "9" * 5000, (0, 99)),
    ],
)
def test_single_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


def test_a_range_past_the_end_is_not_satisfiable() -> None:
    for header in ("bytes=100-", "bytes=-0", "bytes=" + "9" * 5000 + "-5"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 100)


def test_if_none_match() -> None:
    assert etag_matches('"abc"', '"abc"')
    assert etag_matches('W/"abc", "def"', '"abc"')
    assert etag_matches("*", '"abc"')
    assert not etag_matches('"abd"', '"abc"') and not etag_matches(None, '"abc"')


def test_bearer_keys() -> None:
    assert bearer_key("Bearer rf_abc") == "rf_abc"
    assert bearer_key("bearer   rf_abc ") == "rf_abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer a b", "Bearer " + "k" * 600):
        with pytest.raises(Unauthenticated):
            bearer_key(bad)


def test_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        Env({"RENDERFLOW_GATEWAY_PORT": "0", "RENDERFLOW_BUDGET_DB_MS": "250", **TOKEN_ENV})
    )
    assert settings.port == 0 and settings.host == "127.0.0.1"
    assert settings.budgets.of("db") == 250 and settings.budgets.of("auth") == 100
    assert settings.max_body_bytes == 1024 * 1024 and settings.sse_heartbeat_s == 15
    with pytest.raises(ConfigError, match="RENDERFLOW_GATEWAY_PORT"):
        Settings.from_env(Env({"RENDERFLOW_GATEWAY_PORT": "http"}))
