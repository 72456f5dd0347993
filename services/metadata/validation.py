"""Checks of caller input: names, slugs, texts, ids and page requests.

Every check names the field as the HTTP API does (`slug`, `name`, `text`, `chain_id`,
`page_size`, `page_token`, ...), so the gateway can pass the errors on unchanged.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta
from uuid import UUID

from services.metadata.domain import Cursor
from shared.contract import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, SLUG_PATTERN
from shared.errors import FieldError, NotFound, ValidationFailed

USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SLUG = re.compile(SLUG_PATTERN)

# Where a list starts: before every (created_at, id).
FIRST = Cursor(datetime.min.replace(tzinfo=UTC), UUID(int=0))


class Checks:
    """Collects field errors so that one response names every invalid field at once."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def user_name(self, field: str, value: str) -> None:
        if not USER_NAME.fullmatch(value):
            self.errors.append(FieldError(field, "must be 1 to 64 characters among a-z A-Z 0-9 _ . -"))

    def slug(self, field: str, value: str) -> None:
        if not SLUG.fullmatch(value):
            self.errors.append(
                FieldError(field, "must be 2 to 63 characters among a-z 0-9 and -, not starting with -")
            )

    def text(self, field: str, value: str, maximum: int) -> None:
        if not value.strip():
            self.errors.append(FieldError(field, "must not be empty"))
        elif len(value) > maximum:
            self.errors.append(FieldError(field, f"must be at most {maximum} characters"))
        elif "\x00" in value:
            self.errors.append(FieldError(field, "must not contain NUL characters"))

    def done(self) -> None:
        """Raises ValidationFailed naming every field found invalid so far."""
        if self.errors:
            summary = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
            raise ValidationFailed(summary, self.errors)


def parse_id(value: str, what: str) -> UUID:
    """The UUID `value` names; a malformed id is as unknown as a missing one."""
    try:
        return UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None


def optional_id(value: str, what: str) -> UUID | None:
    """Like parse_id, with "" meaning none."""
    return parse_id(value, what) if value else None


def page_size(value: int) -> int:
    """The page size asked for: 0 means the default, and anything above the cap is capped."""
    if value < 0:
        raise ValidationFailed.field("page_size", "must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(cursor: Cursor) -> str:
    """An opaque page token for the items after `cursor`."""
    raw = f"{_micros(cursor.created_at)}.{cursor.id.hex}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str) -> Cursor:
    """The cursor a page token stands for ("" = the start); anything else is invalid input."""
    if not token:
        return FIRST
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        micros, _, hex_id = raw.partition(".")
        return Cursor(_from_micros(int(micros)), UUID(hex=hex_id))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError, OSError):
        raise ValidationFailed.field("page_token", "is not a token this service issued") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(at: datetime) -> int:
    # Integer arithmetic: a float timestamp would lose the microseconds PostgreSQL keeps.
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)
