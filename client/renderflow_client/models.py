"""Renderflow's resources as typed, read-only objects. Each keeps the JSON it was read from in
`raw`, so fields added to the API later are not out of reach."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
"""The statuses a render ends in."""


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Output:
    """What a render made: where to download it, and what it is."""

    url: str
    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    duration_s: float | None = None
    download_url: str | None = None
    """A presigned URL of the object store (asked for with `download_url=True`), usable without the
    API key until `download_expires_at`."""
    download_expires_at: datetime | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Output:
        return cls(
            url=data["url"],
            content_type=data["content_type"],
            bytes=data["bytes"],
            width=data["width"],
            height=data["height"],
            sha256=data["sha256"],
            duration_s=data.get("duration_s"),
            download_url=data.get("download_url"),
            download_expires_at=_time(data.get("download_expires_at")),
        )

    @property
    def extension(self) -> str:
        """The file extension its type calls for (`.png`, `.mp4`, ...)."""
        subtype = self.content_type.split("/")[-1].split(";")[0]
        return {"jpeg": ".jpg", "quicktime": ".mov"}.get(subtype, f".{subtype}")


@dataclass(frozen=True)
class ErrorInfo:
    """Why a render failed, was cancelled or expired."""

    code: str
    reason: str
    message: str
    retryable: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorInfo:
        return cls(
            data.get("code", ""), data.get("reason", ""), data.get("message", ""), bool(data.get("retryable"))
        )


@dataclass(frozen=True)
class Render:
    """A render as the API shows it."""

    id: str
    status: str
    kind: str
    project: str
    prompt: str
    progress: float
    params: dict[str, Any]
    output: Output | None
    error: ErrorInfo | None
    queue_position: int | None
    eta_s: float | None
    remaining_s: float | None
    attempts: int
    trace_id: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Render:
        return cls(
            id=data["id"],
            status=data["status"],
            kind=data.get("kind", "image"),
            project=data.get("project", ""),
            prompt=data.get("prompt", ""),
            progress=float(data.get("progress") or 0.0),
            params=dict(data.get("params") or {}),
            output=Output.from_json(data["output"]) if data.get("output") else None,
            error=ErrorInfo.from_json(data["error"]) if data.get("error") else None,
            queue_position=data.get("queue_position"),
            eta_s=data.get("eta_s"),
            remaining_s=data.get("remaining_s"),
            attempts=int(data.get("attempts") or 0),
            trace_id=data.get("trace_id"),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
            raw=data,
        )

    @property
    def done(self) -> bool:
        """Whether it has ended (succeeded, failed, cancelled or expired)."""
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True)
class RenderEvent:
    """One entry of a render's event log: `seq` counts from 1 without gaps."""

    seq: int
    type: str
    render_id: str
    at: datetime | None
    progress: float | None = None
    phase: str | None = None
    message: str | None = None
    error: ErrorInfo | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenderEvent:
        return cls(
            seq=int(data["seq"]),
            type=data["type"],
            render_id=data["render_id"],
            at=_time(data.get("at")),
            progress=data.get("progress"),
            phase=data.get("phase"),
            message=data.get("message"),
            error=ErrorInfo.from_json(data["error"]) if data.get("error") else None,
            raw=data,
        )

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


@dataclass(frozen=True)
class Batch:
    """Renders submitted together (all queued, or none)."""

    id: str
    renders: list[Render]
    counts: dict[str, int]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Batch:
        renders = [Render.from_json(r) for r in data.get("renders") or ()]
        return cls(
            id=data.get("id") or data["batch_id"],
            renders=renders,
            counts=dict(data.get("counts") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Upload:
    """An image uploaded to serve as a reference (`reference={"upload_id": upload.id}`)."""

    id: str
    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    created_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Upload:
        return cls(
            id=data["id"],
            content_type=data["content_type"],
            bytes=data["bytes"],
            width=data["width"],
            height=data["height"],
            sha256=data["sha256"],
            created_at=_time(data.get("created_at")),
            expires_at=_time(data.get("expires_at")),
        )


@dataclass(frozen=True)
class Project:
    id: str
    slug: str
    name: str
    default_chain_id: str
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Project:
        return cls(
            data["id"], data["slug"], data["name"], data["default_chain_id"], _time(data.get("created_at"))
        )


@dataclass(frozen=True)
class Chain:
    id: str
    project: str
    name: str
    is_default: bool
    length: int
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chain:
        return cls(
            data["id"],
            data["project"],
            data["name"],
            bool(data["is_default"]),
            int(data.get("length") or 0),
            _time(data.get("created_at")),
        )


@dataclass(frozen=True)
class Rule:
    id: str
    project: str
    chain_id: str | None
    text: str
    active: bool
    created_at: datetime | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        return cls(
            data["id"],
            data["project"],
            data.get("chain_id"),
            data["text"],
            bool(data["active"]),
            _time(data.get("created_at")),
        )


@dataclass(frozen=True)
class WebhookEndpoint:
    """A project's standing receiver of its renders' events; `secret` only in the answer that made it."""

    id: str
    project: str
    url: str
    events: list[str]
    state: str
    """`enabled`, or `disabled` (by its owner, or after failing for days: `raw["disabled_reason"]`)."""
    secret: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebhookEndpoint:
        events = list(data.get("events") or ())
        return cls(
            data["id"], data["project"], data["url"], events, data.get("state", ""), data.get("secret"), data
        )
