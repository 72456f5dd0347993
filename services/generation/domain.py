"""The generation service's domain values: render specs, renders, events, batches and their states."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from shared.contract import HEIGHT, STEPS, TERMINAL, TIMINGS, WIDTH

TIMING_NAMES: tuple[str, ...] = tuple(f"{name}_ms" for name in TIMINGS)
"""The keys of a render's `timings`, in the order they happen."""


@dataclass(frozen=True)
class Params:
    """Generation parameters; video ones are ignored for images."""

    width: int = WIDTH.default
    height: int = HEIGHT.default
    steps: int = STEPS.default
    seed: int = 0
    duration_s: float = 0.0
    fps: int = 0
    workflow: str = ""
    """The registered workflow that makes it (the comfyui backend's); empty: the default."""


WEBHOOK_EVENTS = ("queued", "started", "progress", "completed")
"""What a webhook may receive: `completed` is any end (succeeded, failed, cancelled, expired)."""


@dataclass(frozen=True)
class Webhook:
    """Where a render's events are sent, and which."""

    url: str
    events: tuple[str, ...] = ("completed",)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Webhook:
        return cls(data["url"], tuple(data.get("events") or ("completed",)))


@dataclass(frozen=True)
class ReferenceOutcome:
    """What became of a render's reference once the render ran: used, or not and why (`reason` as
    the fetch or the lookup names it: timeout, blocked_address, http_404, nothing_to_continue, ...)."""

    used: bool
    reason: str = ""
    message: str = ""
    source_render_id: str = ""
    """The render whose output served as the reference (for a chain: the render it continued from)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "reason": self.reason,
            "message": self.message,
            "source_render_id": self.source_render_id,
        }


@dataclass(frozen=True)
class Reference:
    """Where the reference image comes from: a URL, another render's output, the output of the
    previous render of the same chain, or an upload (exactly one); and, once the render has run, its
    outcome."""

    url: str = ""
    render_id: str = ""
    required: bool = False
    chain_previous: bool = False
    upload_id: str = ""
    outcome: ReferenceOutcome | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "url": self.url,
            "render_id": self.render_id,
            "required": self.required,
            "chain_previous": self.chain_previous,
        }
        if self.upload_id:  # rows of before uploads have none, and read the same
            data["upload_id"] = self.upload_id
        if self.outcome is not None:
            data["outcome"] = self.outcome.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reference:
        outcome = data.get("outcome")
        return cls(
            url=data.get("url", ""),
            render_id=data.get("render_id", ""),
            required=data.get("required", False),
            chain_previous=data.get("chain_previous", False),
            upload_id=data.get("upload_id", ""),
            outcome=ReferenceOutcome(**outcome) if outcome else None,
        )


@dataclass(frozen=True)
class Rule:
    """A rule as snapshotted when the render was prepared."""

    id: str
    text: str


@dataclass(frozen=True)
class RenderSpec:
    """One render to queue, as its caller states it (before validation): the project (slug or
    id) and chain (empty: the project's default) it goes to are resolved by the catalog, its
    position and rules decided when it is queued."""

    render_id: str = ""
    project: str = ""
    chain_id: str = ""
    kind: str = "image"
    prompt: str = ""
    negative_prompt: str = ""
    params: Params = field(default_factory=Params)
    reference: Reference | None = None
    priority: int = 0
    deadline: datetime | None = None
    """Not started by then: it ends `expired`; still running then: cancelled (reason `deadline`)."""
    timeout_s: float = 0.0
    """The most its generation may take (0: the kind's configured maximum, which also caps it)."""
    retry_of: str = ""
    """The render it retries (set by a retry, never by a caller)."""
    retention_s: float = 0.0
    """How long its output is kept once it succeeds (0: the service's default)."""
    webhook: Webhook | None = None
    """Where its events are sent as they happen."""


@dataclass(frozen=True)
class Submission:
    """Who submits, with what dedupe key and trace, and the time already spent upstream."""

    user_id: str
    idempotency_key: str = ""
    request_hash: str = ""
    traceparent: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    min_change_seq: int = 0
    """The metadata change the caller last saw acknowledged: the catalog is read as of it or later."""


@dataclass(frozen=True)
class RenderError:
    """Why a render failed (`code`: reference_fetch_failed, generation_failed, ...)."""

    code: str
    reason: str = ""
    message: str = ""
    retryable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "retryable": self.retryable,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenderError:
        return cls(
            data["code"], data.get("reason", ""), data.get("message", ""), data.get("retryable", False)
        )


@dataclass(frozen=True)
class Output:
    """A finished render's stored bytes, as described to clients."""

    url: str
    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    duration_s: float = 0.0


@dataclass(frozen=True)
class DownloadLink:
    """A URL that fetches an output from the object store itself, without credentials, until
    `expires_at`."""

    url: str
    expires_at: datetime


@dataclass(frozen=True)
class Render:
    """A render as stored, with the derived queue figures filled in by queries that ask for them."""

    id: str
    user_id: str
    project_id: str
    project: str
    chain_id: str
    position: int
    kind: str
    status: str
    progress: float
    prompt: str
    negative_prompt: str
    params: Params
    rules: tuple[Rule, ...]
    reference: Reference | None
    batch_id: str
    output: Output | None
    error: RenderError | None
    timings: dict[str, float]
    attempts: int
    trace_id: str
    traceparent: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_progress_at: datetime | None
    deadline: datetime | None = None
    timeout_s: float = 0.0
    retry_of: str = ""
    retries: tuple[str, ...] = ()
    """The renders that retried it, oldest first."""
    retention_s: float | None = None
    """How long its output is kept once it succeeded (None: for ever)."""
    output_expires_at: datetime | None = None
    output_deleted_at: datetime | None = None
    """When its output was deleted (its retention ran out, or its user deleted it)."""
    backend: str = ""
    """The backend that ran its latest attempt (empty before one started)."""
    provider_request_id: str = ""
    """The provider's own id of that attempt's request (a prediction id, an API request id)."""
    webhook: Webhook | None = None
    queue_position: int | None = None
    eta_s: float | None = None
    remaining_s: float | None = None
    stalled: bool = False
    download: DownloadLink | None = None
    """Asked for, and the store can sign one: a direct link to the output."""
    waiting_on: str = ""
    """While it waits for its chain predecessor to end: that render's id."""
    replayed: bool = False
    """Answered to a submit that repeated an earlier one (same id or idempotency key)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Event:
    """One entry of a render's event log; `seq` counts from 1 without gaps."""

    render_id: str
    seq: int
    type: str
    at: datetime
    progress: float | None = None
    phase: str = ""
    message: str = ""
    error: RenderError | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


@dataclass(frozen=True)
class NewEvent:
    """An event to append; its seq and time are assigned by the store."""

    type: str
    progress: float | None = None
    phase: str = ""
    message: str = ""
    error: RenderError | None = None

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.progress is not None:
            data["progress"] = self.progress
        if self.phase:
            data["phase"] = self.phase
        if self.message:
            data["message"] = self.message
        if self.error is not None:
            data["error"] = self.error.to_json()
        return data


@dataclass(frozen=True)
class Ended:
    """A render that has just reached an end, by whichever path ended it (its worker, the
    rescuer, a cancel, a failed chain predecessor): what the metrics count."""

    render_id: str
    kind: str
    status: str
    error: RenderError | None = None


Cancelled = Literal["cancelled", "requested", "already"]
"""What a cancel did: cancelled a queued render, flagged a running one for its worker, or found the
render cancelled or expired already (and left it)."""


@dataclass(frozen=True)
class Batch:
    """Renders submitted together, with how many are in each status."""

    id: str
    user_id: str
    created_at: datetime
    counts: dict[str, int]
    renders: list[Render]
    replayed: bool = False
    """Answered to a submit that repeated an earlier one (same idempotency key)."""


@dataclass(frozen=True)
class RenderFilter:
    """What ListRenders selects; empty strings mean any."""

    project_id: str = ""
    chain_id: str = ""
    status: str = ""
    kind: str = ""
    batch_id: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    by_position: bool = False


@dataclass(frozen=True)
class Page:
    """One page of renders and the token of the next (empty at the end)."""

    renders: list[Render]
    next_page_token: str
