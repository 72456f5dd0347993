"""The metadata service: validates what callers ask, issues API keys, and calls the store.

Shared by the gRPC servicer and the administrative functions (`admin.py`), so that both apply
the same rules and write the same change-feed rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol, TypeVar
from uuid import UUID

from services.metadata import keys, validation
from services.metadata.domain import ApiKey, Chain, Cursor, IssuedKey, Page, Project, Resolved, Rule, User
from services.metadata.store import Store
from services.metadata.validation import Checks, optional_id, parse_id
from shared.contract import MAX_NAME, MAX_RULE_TEXT
from shared.errors import Conflict, Unauthenticated


class _Listed(Protocol):
    @property
    def created_at(self) -> datetime: ...
    @property
    def id(self) -> UUID: ...


L = TypeVar("L", bound=_Listed)


async def _paged(
    page_size: int, page_token: str, fetch: Callable[[Cursor, int], Awaitable[list[L]]]
) -> Page[L]:
    """One page by keyset: asks for one item more than the page holds to learn if more follow."""
    limit = validation.page_size(page_size)
    items = await fetch(validation.decode_token(page_token), limit + 1)
    if len(items) <= limit:
        return Page(items, "")
    last = items[limit - 1]
    return Page(items[:limit], validation.encode_token(Cursor(last.created_at, last.id)))


class Metadata:
    """Users, API keys, projects, chains and rules, each call scoped to the calling user."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # Users and API keys.

    async def create_user(self, name: str) -> tuple[User, IssuedKey]:
        """A new user and its first key; Conflict when the name is taken."""
        checks = Checks()
        checks.user_name("name", name)
        checks.done()
        secret = keys.new_secret()
        user, key = await self._store.create_user(name, keys.key_hash(secret), keys.display_prefix(secret))
        return user, IssuedKey(secret, key)

    async def create_api_key(self, user_name: str) -> IssuedKey:
        """A further key for the named user."""
        secret = keys.new_secret()
        key = await self._store.create_api_key(user_name, keys.key_hash(secret), keys.display_prefix(secret))
        return IssuedKey(secret, key)

    async def list_api_keys(self, user_name: str) -> list[ApiKey]:
        """The named user's keys (ids and prefixes, never secrets), oldest first."""
        return await self._store.list_api_keys(user_name)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        """Revokes a key; revoking a revoked key changes nothing."""
        return await self._store.revoke_api_key(parse_id(key_id, "API key"))

    async def authenticate(self, secret: str) -> tuple[User, UUID]:
        """The user a valid key belongs to, and the key's id; Unauthenticated otherwise."""
        found = await self._store.authenticate(keys.key_hash(secret)) if secret else None
        if found is None:
            raise Unauthenticated("unknown or revoked API key")
        return found

    async def ensure_user_key(self, name: str, secret: str | None) -> str:
        """The key in force for the named user, creating the user when missing: `secret` made
        valid when given, else a newly issued key."""
        if secret is None:
            try:
                _, issued = await self.create_user(name)
            except Conflict:
                issued = await self.create_api_key(name)
            return issued.secret
        checks = Checks()
        checks.user_name("name", name)
        checks.done()
        keys.check_chosen_secret(secret)
        await self._store.ensure_api_key(name, keys.key_hash(secret), keys.display_prefix(secret))
        return secret

    # Projects.

    async def create_project(self, user_id: str, slug: str, name: str) -> Project:
        """A new project with its default chain; Conflict when the user has the slug."""
        checks = Checks()
        checks.slug("slug", slug)
        checks.text("name", name, MAX_NAME)
        checks.done()
        return await self._store.create_project(parse_id(user_id, "user"), slug, name)

    async def get_project(self, user_id: str, slug: str) -> Project:
        """The user's project with this slug."""
        return await self._store.get_project(parse_id(user_id, "project"), slug)

    async def list_projects(self, user_id: str, page_size: int, page_token: str) -> Page[Project]:
        """A page of the user's projects, in creation order."""
        owner = parse_id(user_id, "user")
        return await _paged(
            page_size, page_token, lambda after, limit: self._store.list_projects(owner, after, limit)
        )

    # Chains.

    async def create_chain(self, user_id: str, project: str, name: str) -> Chain:
        """A new chain in the user's project."""
        checks = Checks()
        checks.text("name", name, MAX_NAME)
        checks.done()
        return await self._store.create_chain(parse_id(user_id, "project"), project, name)

    async def get_chain(self, user_id: str, project: str, chain_id: str) -> Chain:
        """A chain of the user's project."""
        return await self._store.get_chain(parse_id(user_id, "project"), project, parse_id(chain_id, "chain"))

    async def list_chains(self, user_id: str, project: str, page_size: int, page_token: str) -> Page[Chain]:
        """A page of the project's chains, in creation order."""
        owner = parse_id(user_id, "project")
        return await _paged(
            page_size, page_token, lambda after, limit: self._store.list_chains(owner, project, after, limit)
        )

    # Rules.

    async def create_rule(
        self, user_id: str, project: str, chain_id: str, text: str, active: bool | None
    ) -> Rule:
        """A new rule, project-wide when `chain_id` is empty; active unless said otherwise."""
        checks = Checks()
        checks.text("text", text, MAX_RULE_TEXT)
        checks.done()
        return await self._store.create_rule(
            parse_id(user_id, "project"),
            project,
            optional_id(chain_id, "chain"),
            text,
            True if active is None else active,
        )

    async def list_rules(self, user_id: str, project: str, page_size: int, page_token: str) -> Page[Rule]:
        """A page of the project's rules (project-wide and per chain), in creation order."""
        owner = parse_id(user_id, "project")
        return await _paged(
            page_size, page_token, lambda after, limit: self._store.list_rules(owner, project, after, limit)
        )

    async def update_rule(
        self, user_id: str, project: str, rule_id: str, text: str | None, active: bool | None
    ) -> Rule:
        """Changes a rule's text and/or activity; None leaves a field as it is."""
        if text is not None:
            checks = Checks()
            checks.text("text", text, MAX_RULE_TEXT)
            checks.done()
        return await self._store.update_rule(
            parse_id(user_id, "project"), project, parse_id(rule_id, "rule"), text, active
        )

    async def delete_rule(self, user_id: str, project: str, rule_id: str) -> None:
        """Deletes a rule of the user's project."""
        await self._store.delete_rule(parse_id(user_id, "project"), project, parse_id(rule_id, "rule"))

    # What generation's submit path reads (and caches).

    async def resolve_render(self, user_id: str, project: str, chain_id: str) -> Resolved:
        """The project (slug or id), chain (the default one when `chain_id` is empty) and active
        rules a render is made with, read at once; NotFound for an unknown project or chain."""
        return await self._store.resolve_render(
            parse_id(user_id, "project"), project, optional_id(chain_id, "chain")
        )
