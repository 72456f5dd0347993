"""The webhooks' API side as domain operations: a project's endpoints, the signing secrets, and the
delivery log, each on behalf of a user (another user's project, endpoint or delivery is NotFound)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.generation.catalog import Catalog
from services.generation.pages import decode_token, encode_token, page_size
from services.generation.webhooks.receivers import receiver_events, receiver_url
from services.generation.webhooks.settings import WebhookSettings
from services.generation.webhooks.store import Delivery, Endpoint, Secret, WebhookStore
from shared.errors import NotFound, ValidationFailed

MAX_DESCRIPTION = 500
MAX_OVERLAP_S = 7 * 86400.0
"""The longest a rotated secret may keep signing beside its successor."""


@dataclass(frozen=True)
class DeliveryPage:
    deliveries: list[Delivery]
    next_page_token: str


class Webhooks:
    """Endpoints, secrets and deliveries of a user's projects and renders."""

    def __init__(
        self,
        store: WebhookStore,
        catalog: Catalog,
        settings: WebhookSettings,
        render_exists: RenderLookup,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._settings = settings
        self._render_exists = render_exists

    async def _project(self, user_id: str, project: str) -> tuple[str, str]:
        """(id, slug) of the user's project; NotFound otherwise."""
        placement = await self._catalog.place(user_id, project, "")
        return placement.project_id, placement.project

    async def create_endpoint(
        self, user_id: str, project: str, url: str, events: Sequence[str], description: str
    ) -> Endpoint:
        checked_url, checked_events = self._url(url), self._events(events)
        _check_description(description)
        project_id, slug = await self._project(user_id, project)
        return await self._store.create_endpoint(
            user_id, project_id, slug, checked_url, checked_events, description
        )

    async def endpoints(self, user_id: str, project: str) -> list[Endpoint]:
        project_id, _ = await self._project(user_id, project)
        return await self._store.endpoints(user_id, project_id)

    async def endpoint(self, user_id: str, project: str, endpoint_id: str) -> Endpoint:
        project_id, _ = await self._project(user_id, project)
        return await self._store.endpoint(user_id, project_id, _uuid(endpoint_id, "webhook endpoint"))

    async def update_endpoint(
        self,
        user_id: str,
        project: str,
        endpoint_id: str,
        *,
        url: str | None,
        events: Sequence[str] | None,
        enabled: bool | None,
        description: str | None,
    ) -> Endpoint:
        checked_url = self._url(url) if url is not None else None
        checked_events = self._events(events) if events is not None else None
        if description is not None:
            _check_description(description)
        project_id, _ = await self._project(user_id, project)
        return await self._store.update_endpoint(
            user_id,
            project_id,
            _uuid(endpoint_id, "webhook endpoint"),
            url=checked_url,
            events=checked_events,
            enabled=enabled,
            description=description,
        )

    async def delete_endpoint(self, user_id: str, project: str, endpoint_id: str) -> Endpoint:
        project_id, _ = await self._project(user_id, project)
        return await self._store.delete_endpoint(user_id, project_id, _uuid(endpoint_id, "webhook endpoint"))

    async def rotate_secret(self, user_id: str, project: str, endpoint_id: str, overlap_s: float) -> Secret:
        """A new secret for the endpoint, or (neither named) for the user's render webhooks."""
        if not 0 <= overlap_s <= MAX_OVERLAP_S:
            raise ValidationFailed.field("overlap_s", f"must be between 0 and {MAX_OVERLAP_S:g} seconds")
        overlap = overlap_s or self._settings.rotation_overlap_s
        if not project and not endpoint_id:
            return await self._store.rotate_user_secret(user_id, overlap)
        project_id, _ = await self._project(user_id, project)
        return await self._store.rotate_endpoint_secret(
            user_id, project_id, _uuid(endpoint_id, "webhook endpoint"), overlap
        )

    async def user_secret(self, user_id: str) -> Secret:
        return await self._store.user_secret(user_id)

    async def deliveries(
        self,
        user_id: str,
        *,
        render_id: str = "",
        project: str = "",
        endpoint_id: str = "",
        size: int = 0,
        page_token: str = "",
    ) -> DeliveryPage:
        """A render's deliveries, or an endpoint's, newest first, a page at a time."""
        limit = page_size(size)
        before = _cursor(page_token)
        if render_id:
            await self._render_exists(user_id, render_id)
            found = await self._store.deliveries(user_id, render_id=render_id, limit=limit + 1, before=before)
        else:
            await self.endpoint(user_id, project, endpoint_id)
            found = await self._store.deliveries(
                user_id, endpoint_id=endpoint_id, limit=limit + 1, before=before
            )
        page, more = found[:limit], len(found) > limit
        token = encode_token(page[-1].created_at.isoformat(), page[-1].id) if more else ""
        return DeliveryPage(page, token)

    async def redeliver(self, user_id: str, delivery_id: str) -> Delivery:
        return await self._store.redeliver(user_id, _uuid(delivery_id, "delivery"))

    def _url(self, url: str) -> str:
        try:
            return receiver_url(url, self._settings.allow)
        except ValueError as exc:
            raise ValidationFailed.field("url", str(exc)) from None

    @staticmethod
    def _events(events: Sequence[str]) -> tuple[str, ...]:
        try:
            return receiver_events(events)
        except ValueError as exc:
            raise ValidationFailed.field("events", str(exc)) from None


RenderLookup = Callable[[str, str], Awaitable[object]]
"""`await lookup(user_id, render_id)`: NotFound unless the user has the render."""


def _uuid(value: str, what: str) -> str:
    """`value` if it is a UUID; else NotFound (another user's id and a malformed one read alike)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"no {what} {value[:64]}") from None


def _check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise ValidationFailed.field(
            "description", f"must be at most {MAX_DESCRIPTION} characters, without NUL"
        )


def _cursor(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    created_at, delivery_id = decode_token(token, str)
    try:
        return datetime.fromisoformat(created_at), str(uuid.UUID(delivery_id))
    except ValueError:
        raise ValidationFailed.field("page_token", "is not a token this service issued") from None
