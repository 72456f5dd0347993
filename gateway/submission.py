"""Render requests as generation RenderSpecs (with their webhook), and the `Prefer: wait=N`
preference of a submit."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from renderflow.v1 import generation_pb2

from gateway.state import TIMER
from shared.contract import PARAMS
from shared.errors import ValidationFailed
from shared.http_headers import preferences
from shared.render_json import KINDS

SEED_LIMIT = 2**32
"""Random seeds are below this."""


def render_params(kind: str, given: dict[str, Any]) -> generation_pb2.RenderParams:
    """The render's parameters: the given ones of its kind, defaults for the rest, a random seed if
    none."""
    # type(default): JSON Schema counts 512.0 as an integer; protobuf wants the int.
    values: dict[str, Any] = {
        name: type(param.default)(given.get(name, param.default)) for name, param in PARAMS[kind].items()
    }
    params = generation_pb2.RenderParams(**values)
    params.seed = int(given["seed"]) if "seed" in given else secrets.randbelow(SEED_LIMIT)
    params.workflow = given.get("workflow") or ""
    return params


def reference(given: dict[str, Any] | None) -> generation_pb2.Reference | None:
    """The reference image's source: a URL, another render, an upload, or (`previous: true`) the
    render before this one in its chain (generation drops it for the first render of a chain)."""
    if not given:
        return None
    ref = generation_pb2.Reference(required=bool(given.get("required", False)))
    if "url" in given:
        ref.url = given["url"]
    elif "render_id" in given:
        ref.render_id = given["render_id"]
    elif "upload_id" in given:
        ref.upload_id = given["upload_id"]
    else:
        ref.chain_previous = True
    return ref


def render_spec(
    fields: dict[str, Any], project: str, chain_id: str | None, *, field_prefix: str = ""
) -> generation_pb2.RenderSpec:
    """What generation queues, as the client stated it: generation resolves the project (slug)
    and chain (None: the project's default) and decides the position and rules. A field error
    names its field after `field_prefix` (`items[3].`)."""
    spec = generation_pb2.RenderSpec(
        project=project,
        chain_id=chain_id or "",
        kind=KINDS[fields["kind"]],
        prompt=fields["prompt"],
        negative_prompt=fields.get("negative_prompt") or "",
        params=render_params(fields["kind"], fields.get("params", {})),
        reference=reference(fields.get("reference")),
        timeout_s=float(fields.get("timeout_s") or 0.0),
        priority=int(fields.get("priority", 0)),
        retention_s=float(fields.get("retention_s") or 0.0),
    )
    if fields.get("deadline") is not None:
        spec.deadline.FromDatetime(deadline(fields["deadline"], f"{field_prefix}deadline"))
    if fields.get("webhook"):
        spec.webhook.CopyFrom(webhook(fields["webhook"]))
    return spec


def webhook(given: dict[str, Any]) -> generation_pb2.WebhookSubscription:
    """Where to send a render's events, and which (none named: `completed`). Generation checks the
    URL (a public address, unless allow-listed) and answers a field error naming `webhook.url`."""
    return generation_pb2.WebhookSubscription(url=given["url"], events=given.get("events") or ["completed"])


def deadline(given: str | float, field: str) -> datetime:
    """A deadline as a request states it: an RFC 3339 time with its offset, or seconds from now."""
    if not isinstance(given, str):
        return datetime.now(UTC) + timedelta(seconds=given)
    return moment(given, field, "must be an RFC 3339 date-time or a number of seconds")


def moment(text: str, field: str, malformed: str = "must be an RFC 3339 date-time") -> datetime:
    """An RFC 3339 date-time with its offset; ValidationFailed naming `field` otherwise."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationFailed.field(field, malformed) from None
    if parsed.tzinfo is None:
        raise ValidationFailed.field(field, "must have a time zone offset (e.g. Z)")
    return parsed


def prefer_wait(request: web.Request, max_wait_s: float) -> float | None:
    """The seconds of a `Prefer: wait=N` header (RFC 7240), clamped to `max_wait_s`; None without
    one. Like any preference, a malformed one is ignored rather than refused."""
    value = preferences(request.headers.getall("Prefer", [])).get("wait", "")
    return min(float(value), max_wait_s) if value.isascii() and value.isdigit() else None


def spent_so_far(request: web.Request) -> generation_pb2.Timings:
    """The phases of the request before it reached generation, to be kept on the render."""
    phases = request[TIMER].phases
    return generation_pb2.Timings(
        auth_ms=phases.get("auth", 0.0), validation_ms=phases.get("validation", 0.0)
    )
