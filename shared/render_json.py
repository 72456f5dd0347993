"""A render and its events as the HTTP API shows them (`GET /v1/renders/{id}`), from generation's
protobuf messages: what the gateway answers and what webhooks carry, one representation."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2
from renderflow.v1 import generation_pb2

from shared import contract

JSON = dict[str, Any]

KINDS = {"image": generation_pb2.RENDER_KIND_IMAGE, "video": generation_pb2.RENDER_KIND_VIDEO}
STATUSES = {
    "queued": generation_pb2.RENDER_STATUS_QUEUED,
    "running": generation_pb2.RENDER_STATUS_RUNNING,
    "succeeded": generation_pb2.RENDER_STATUS_SUCCEEDED,
    "failed": generation_pb2.RENDER_STATUS_FAILED,
    "cancelled": generation_pb2.RENDER_STATUS_CANCELLED,
    "expired": generation_pb2.RENDER_STATUS_EXPIRED,
}
_KIND_NAMES = {value: name for name, value in KINDS.items()}
_STATUS_NAMES = {value: name for name, value in STATUSES.items()}
TERMINAL_STATUSES = frozenset(STATUSES[name] for name in contract.TERMINAL)


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 in UTC (`2025-01-02T03:04:05.678Z`)."""
    text: str = value.ToJsonString()
    return text


def _maybe_time(message: Any, field: str) -> str | None:
    return timestamp(getattr(message, field)) if message.HasField(field) else None


def error_json(error: generation_pb2.RenderError) -> JSON:
    return {
        "code": error.code,
        "reason": error.reason,
        "message": error.message,
        "retryable": error.retryable,
    }


def reference_json(reference: generation_pb2.Reference) -> JSON | None:
    """`{url | render_id | upload_id | previous: true, required}` as requests name references, and what became
    of it: `used` (null until the render has run), `reason` and `message` when it was not used,
    `source_render_id`: the render whose output served (a chain's: the one it continued from)."""
    source = reference.WhichOneof("source")
    if source is None:
        return None
    body: JSON = {"previous": True} if source == "chain_previous" else {source: getattr(reference, source)}
    used = reference.used if reference.HasField("used") else None
    body.update(
        required=reference.required,
        used=used,
        reason=reference.reason or None,
        message=reference.message or None,
        source_render_id=reference.source_render_id or None,
    )
    return body


def render_json(render: generation_pb2.Render) -> JSON:
    """A render: status, progress, queue position, timings, output, error, trace id."""
    is_video = render.kind == generation_pb2.RENDER_KIND_VIDEO
    params = render.params
    output = render.output
    return {
        "id": render.id,
        "project": render.project,
        "chain_id": render.chain_id,
        "position": render.position,
        "kind": _KIND_NAMES.get(render.kind, "image"),
        "status": _STATUS_NAMES.get(render.status, "queued"),
        "progress": render.progress,
        "queue_position": render.queue_position if render.HasField("queue_position") else None,
        "eta_s": render.eta_s if render.HasField("eta_s") else None,
        "remaining_s": render.remaining_s if render.HasField("remaining_s") else None,
        "prompt": render.prompt,
        "negative_prompt": render.negative_prompt or None,
        "params": {
            "width": params.width,
            "height": params.height,
            "steps": params.steps,
            "seed": params.seed,
            "duration_s": params.duration_s if is_video else None,
            "fps": params.fps if is_video else None,
            "workflow": params.workflow or None,
        },
        "rules": [{"id": rule.id, "text": rule.text} for rule in render.rules],
        "reference": reference_json(render.reference),
        "batch_id": render.batch_id or None,
        "output": {
            "url": output.url or f"/v1/renders/{render.id}/output",
            "content_type": output.content_type,
            "bytes": output.bytes,
            "width": output.width,
            "height": output.height,
            "duration_s": output.duration_s if is_video else None,
            "sha256": output.sha256,
            "download_url": output.download_url or None,
            "download_expires_at": _maybe_time(output, "download_expires_at"),
        }
        if render.HasField("output")
        else None,
        "error": error_json(render.error) if render.HasField("error") else None,
        "timings": {
            f"{name}_ms": getattr(render.timings, f"{name}_ms")
            if render.timings.HasField(f"{name}_ms")  # type: ignore[arg-type]
            else None
            for name in contract.TIMINGS
        },
        "attempts": render.attempts,
        "trace_id": render.trace_id or None,
        "created_at": _maybe_time(render, "created_at"),
        "started_at": _maybe_time(render, "started_at"),
        "finished_at": _maybe_time(render, "finished_at"),
        "last_progress_at": _maybe_time(render, "last_progress_at"),
        "stalled": render.stalled,
        "waiting_on": render.waiting_on or None,
        "deadline": _maybe_time(render, "deadline"),
        "timeout_s": render.timeout_s or None,
        "priority": render.priority,
        "retention_s": render.retention_s if render.HasField("retention_s") else None,
        "output_expires_at": _maybe_time(render, "output_expires_at"),
        "output_deleted_at": _maybe_time(render, "output_deleted_at"),
        "backend": render.backend or None,
        "provider_request_id": render.provider_request_id or None,
        "webhook": {"url": render.webhook.url, "events": list(render.webhook.events) or ["completed"]}
        if render.webhook.url
        else None,
        "retry_of": render.retry_of or None,
        "retries": list(render.retries),
    }


def event_json(event: generation_pb2.RenderEvent) -> JSON:
    """An event: `{seq, type, render_id, at, progress?, phase?, message?, error?}`."""
    body: JSON = {
        "seq": event.seq,
        "type": event.type,
        "render_id": event.render_id,
        "at": timestamp(event.at),
    }
    if event.HasField("progress"):
        body["progress"] = event.progress
    if event.phase:
        body["phase"] = event.phase
    if event.message:
        body["message"] = event.message
    if event.HasField("error"):
        body["error"] = error_json(event.error)
    return body
