"""Webhooks in schema `generation`: receivers, signing secrets, and the deliveries the outbox trigger
makes (migration 0010) with their attempts."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from services.generation.records import fetch_all, fetch_one
from services.generation.store import connection
from shared.errors import FailedPrecondition, NotFound
from shared.statements import load_queries
from shared.url_guard import DELIVERED

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A signing secret as Standard Webhooks spells one: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Endpoint:
    """A project's standing receiver."""

    id: str
    project: str
    url: str
    events: tuple[str, ...]
    description: str
    enabled: bool
    disabled_reason: str
    failing_since: datetime | None
    created_at: datetime
    secret: str = field(default="", repr=False)
    """Set only when it is to be shown: once, as the endpoint is made."""

    @classmethod
    def from_row(cls, row: dict[str, Any], *, with_secret: bool = False) -> Endpoint:
        return cls(
            id=str(row["id"]),
            project=row["project"],
            url=row["url"],
            events=tuple(row["events"]),
            description=row["description"],
            enabled=row["enabled"],
            disabled_reason=row["disabled_reason"],
            failing_since=row["failing_since"],
            created_at=row["created_at"],
            secret=row["secret"] if with_secret else "",
        )


@dataclass(frozen=True)
class Secret:
    secret: str = field(repr=False)
    previous_expires_at: datetime | None = None


@dataclass(frozen=True)
class Attempt:
    number: int
    at: datetime
    outcome: str
    status: int
    latency_ms: float
    message: str
    response_excerpt: str


@dataclass(frozen=True)
class Delivery:
    """One event for one receiver; `id` is its `webhook-id`."""

    id: str
    user_id: str
    render_id: str
    endpoint_id: str
    url: str
    event: str
    seq: int
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    event_at: datetime | None = None
    """When its event happened (the body's `timestamp`)."""
    body: str | None = None
    traceparent: str = ""
    log: tuple[Attempt, ...] = ()

    @classmethod
    def from_row(cls, row: dict[str, Any], log: Sequence[Attempt] = ()) -> Delivery:
        return cls(
            id=str(row["id"]),
            user_id=row["user_id"],
            render_id=row["render_id"],
            endpoint_id=str(row["endpoint_id"] or ""),
            url=row["url"],
            event=row["event"],
            seq=row["seq"],
            state=row["state"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            next_attempt_at=row["next_attempt_at"] if row["state"] == "pending" else None,
            delivered_at=row["delivered_at"],
            event_at=row["event_at"],
            body=row["body"],
            traceparent=row["traceparent"],
            log=tuple(log),
        )


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to, as the dispatcher records it."""

    at: datetime
    outcome: str
    status: int
    latency_ms: float
    message: str
    excerpt: str
    next_attempt_at: datetime | None
    """None: no more attempts (delivered, or given up)."""
    body: str | None = None
    """The body sent, to keep for the next attempts (None: keep what is kept)."""

    @property
    def delivered(self) -> bool:
        return self.outcome == DELIVERED


class WebhookStore:
    """The statements of webhooks over the generation service's pool (autocommit)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _one(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        async with connection(self._pool) as conn:
            return await fetch_one(conn, QUERIES[name], params)

    async def _found(self, name: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        row = await self._one(name, params)
        if row is None:
            raise NotFound(f"no {what} {params.get('id', '')}".strip())
        return row

    # Receivers and secrets

    async def create_endpoint(
        self, user_id: str, project_id: str, project: str, url: str, events: Sequence[str], description: str
    ) -> Endpoint:
        row = await self._one(
            "create_endpoint",
            {
                "user_id": user_id,
                "project_id": project_id,
                "project": project,
                "url": url,
                "events": list(events),
                "description": description,
                "secret": new_secret(),
            },
        )
        assert row is not None
        return Endpoint.from_row(row, with_secret=True)

    async def endpoints(self, user_id: str, project_id: str) -> list[Endpoint]:
        async with connection(self._pool) as conn:
            rows = await fetch_all(
                conn, QUERIES["endpoints_of_project"], {"user_id": user_id, "project_id": project_id}
            )
        return [Endpoint.from_row(row) for row in rows]

    async def endpoint(self, user_id: str, project_id: str, endpoint_id: str) -> Endpoint:
        params = {"id": endpoint_id, "user_id": user_id, "project_id": project_id}
        return Endpoint.from_row(await self._found("endpoint", params, "webhook endpoint"))

    async def update_endpoint(
        self, user_id: str, project_id: str, endpoint_id: str, **changes: Any
    ) -> Endpoint:
        params = {
            "id": endpoint_id,
            "user_id": user_id,
            "project_id": project_id,
            "url": changes.get("url"),
            "events": list(changes["events"]) if changes.get("events") is not None else None,
            "description": changes.get("description"),
            "enabled": changes.get("enabled"),
        }
        return Endpoint.from_row(await self._found("update_endpoint", params, "webhook endpoint"))

    async def delete_endpoint(self, user_id: str, project_id: str, endpoint_id: str) -> Endpoint:
        params = {"id": endpoint_id, "user_id": user_id, "project_id": project_id}
        return Endpoint.from_row(await self._found("delete_endpoint", params, "webhook endpoint"))

    async def rotate_endpoint_secret(
        self, user_id: str, project_id: str, endpoint_id: str, overlap_s: float
    ) -> Secret:
        params = {
            "id": endpoint_id,
            "user_id": user_id,
            "project_id": project_id,
            "secret": new_secret(),
            "overlap_s": overlap_s,
        }
        row = await self._found("rotate_endpoint_secret", params, "webhook endpoint")
        return Secret(row["secret"], row["previous_expires_at"])

    async def user_secret(self, user_id: str) -> Secret:
        """The user's secret, made on first ask."""
        row = await self._made("user_secret", user_id)
        return Secret(row["secret"], row["previous_expires_at"])

    async def _made(self, query: str, user_id: str) -> dict[str, Any]:
        """`query`'s row of the user's secret, the secret made first when there is none (by this
        call, or by another at the same moment)."""
        row = await self._one(query, {"user_id": user_id})
        if row is None:
            async with connection(self._pool) as conn:
                await conn.execute(QUERIES["make_user_secret"], {"user_id": user_id, "secret": new_secret()})
            row = await self._one(query, {"user_id": user_id})
        assert row is not None
        return row

    async def rotate_user_secret(self, user_id: str, overlap_s: float) -> Secret:
        params = {"user_id": user_id, "secret": new_secret(), "overlap_s": overlap_s}
        row = await self._one("rotate_user_secret", params)
        assert row is not None
        return Secret(row["secret"], row["previous_expires_at"])

    # Deliveries

    async def deliveries(
        self,
        user_id: str,
        *,
        render_id: str = "",
        endpoint_id: str = "",
        limit: int,
        before: tuple[datetime, str] | None = None,
    ) -> list[Delivery]:
        """A render's or an endpoint's deliveries, newest first (those older than `before`), each
        with its attempts."""
        params: dict[str, Any] = {
            "user_id": user_id,
            "render_id": render_id,
            "endpoint_id": endpoint_id or None,
            "limit": limit,
            "before": before[0] if before else None,
            "before_id": before[1] if before else None,
        }
        name = "deliveries_of_render" if render_id else "deliveries_of_endpoint"
        async with connection(self._pool) as conn:
            rows = await fetch_all(conn, QUERIES[name], params)
            attempts = await fetch_all(conn, QUERIES["attempts_of"], {"ids": [row["id"] for row in rows]})
        logs: dict[str, list[Attempt]] = {}
        for attempt in attempts:
            logs.setdefault(str(attempt["delivery_id"]), []).append(_attempt(attempt))
        return [Delivery.from_row(row, logs.get(str(row["id"]), ())) for row in rows]

    async def redeliver(self, user_id: str, delivery_id: str) -> Delivery:
        """The delivery due again at once, with its log; FailedPrecondition when its endpoint was
        deleted."""
        row = await self._found("redeliver", {"id": delivery_id, "user_id": user_id}, "delivery")
        if row["endpoint_deleted"]:
            raise FailedPrecondition("its endpoint was deleted: there is nowhere to deliver it")
        async with connection(self._pool) as conn:
            found = await fetch_one(conn, QUERIES["delivery"], {"id": delivery_id})
            attempts = await fetch_all(conn, QUERIES["attempts_of"], {"ids": [delivery_id]})
        assert found is not None
        return Delivery.from_row(found, [_attempt(row) for row in attempts])

    # The dispatcher

    async def claim(self, limit: int, lease_s: float, per_receiver: int) -> list[Delivery]:
        params = {"limit": limit, "lease_s": lease_s, "per_receiver": per_receiver}
        async with connection(self._pool) as conn:
            rows = await fetch_all(conn, QUERIES["claim_deliveries"], params)
        return [Delivery.from_row(row) for row in rows]

    async def signing_secrets(self, delivery: Delivery) -> list[str]:
        """The secrets that sign `delivery` now: one, or two during a rotation's overlap."""
        if delivery.endpoint_id:
            row = await self._one("endpoint_signing_secrets", {"endpoint_id": delivery.endpoint_id})
        else:
            row = await self._made("user_signing_secrets", delivery.user_id)
        if row is None:  # the endpoint was deleted since: nothing signs for it any more
            return []
        return [secret for secret in (row["secret"], row["previous_secret"]) if secret]

    async def record(self, delivery: Delivery, outcome: Outcome, disable_after_s: float) -> str | None:
        """Records an attempt; the reason its endpoint was disabled by it, if it was."""
        params = {
            "id": delivery.id,
            "number": delivery.attempts,
            "at": outcome.at,
            "outcome": outcome.outcome,
            "status": outcome.status,
            "latency_ms": outcome.latency_ms,
            "message": outcome.message,
            "excerpt": outcome.excerpt,
            "next_attempt_at": outcome.next_attempt_at,
            "delivered": outcome.delivered,
            "disable_after_s": disable_after_s,
            "body": outcome.body,
        }
        row = await self._one("record_attempt", params)
        if row is not None and not row["enabled"] and row["disabled_reason"].startswith("its deliveries"):
            return str(row["disabled_reason"])
        return None

    async def backlog_age_s(self) -> float:
        row = await self._one("oldest_due", {})
        return float(row["age_s"]) if row else 0.0


def _attempt(row: dict[str, Any]) -> Attempt:
    return Attempt(
        row["number"],
        row["at"],
        row["outcome"],
        row["status"],
        row["latency_ms"],
        row["message"],
        row["response_excerpt"],
    )
