"""The metadata service's values: what the store returns and the service hands to its callers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

T = TypeVar("T")


@dataclass(frozen=True)
class User:
    """A tenant: owns API keys and projects."""

    id: UUID
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: never the secret, only who owns it and how to recognise it."""

    id: UUID
    user_id: UUID
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key: the secret (shown once) with its stored record."""

    secret: str
    key: ApiKey


@dataclass(frozen=True)
class Project:
    """A user's project; `slug` is unique per user."""

    id: UUID
    user_id: UUID
    slug: str
    name: str
    default_chain_id: UUID
    created_at: datetime


@dataclass(frozen=True)
class Chain:
    """An ordered sequence of renders in a project; `length` is its last allocated position."""

    id: UUID
    project_id: UUID
    project: str
    name: str
    is_default: bool
    length: int
    created_at: datetime


@dataclass(frozen=True)
class Rule:
    """A text rule applied to renders of a project (chain_id None) or of one chain."""

    id: UUID
    project_id: UUID
    project: str
    chain_id: UUID | None
    text: str
    active: bool
    created_at: datetime


@dataclass(frozen=True)
class RuleSnapshot:
    """A rule's text as it was when a render was prepared."""

    id: UUID
    text: str


@dataclass(frozen=True)
class Resolved:
    """What a render is made with: the project, the chain, the active rules; as of `change_seq`."""

    project: Project
    chain: Chain
    rules: list[RuleSnapshot]
    change_seq: int


@dataclass(frozen=True)
class Change:
    """One entry of the change feed; `seq` increases in commit order."""

    seq: int
    entity: str
    action: str
    entity_id: UUID
    user_id: UUID
    at: datetime


@dataclass(frozen=True)
class Cursor:
    """A keyset position in a list ordered by (created_at, id): the last item of a page."""

    created_at: datetime
    id: UUID


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the token of the next one ("" on the last page)."""

    items: list[T]
    next_page_token: str
