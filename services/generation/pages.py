"""Pages of a user's renders: the filter and keyset order of `list_renders`, and the page tokens
that carry where the next page starts."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from psycopg import sql

from services.generation.domain import Page, Render, RenderFilter
from services.generation.queries import QUERIES
from shared.contract import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from shared.errors import ValidationFailed


def page_size(requested: int) -> int:
    """The size of a page asked for with `requested` (0: the default)."""
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_query(
    user_id: str, where: RenderFilter, size: int, page_token: str
) -> tuple[sql.Composed, list[Any]]:
    """`list_renders` for one page (one row more than `size`, to tell whether another follows),
    and its parameters."""
    clauses: list[sql.Composable] = [sql.SQL("user_id = %s")]
    params: list[Any] = [user_id]
    for column in ("project_id", "chain_id", "status", "kind"):
        value = getattr(where, column)
        if value:
            clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if where.batch_id:
        clauses.append(sql.SQL("batch_id = %s"))
        params.append(_batch_id(where.batch_id))
    if where.created_after is not None:
        clauses.append(sql.SQL("created_at >= %s"))
        params.append(where.created_after)
    if where.created_before is not None:
        clauses.append(sql.SQL("created_at < %s"))
        params.append(where.created_before)
    if where.by_position:
        order = sql.SQL("position, id")
        if page_token:
            clauses.append(sql.SQL("(position, id) > (%s, %s)"))
            params.extend(decode_token(page_token, int))
    else:
        order = sql.SQL("created_at DESC, id DESC")
        if page_token:
            clauses.append(sql.SQL("(created_at, id) < (%s::timestamptz, %s)"))
            params.extend(decode_token(page_token, str))
    query = sql.SQL(QUERIES["list_renders"]).format(
        where=sql.SQL(" AND ").join(clauses), order=order, limit=size + 1
    )
    return query, params


def _batch_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationFailed.field("batch_id", "is not a batch id") from None


def page_of(renders: list[Render], size: int, by_position: bool) -> Page:
    """The page of the first `size` of `renders`, with the token of the next when there are more."""
    page = renders[:size]
    token = ""
    if len(renders) > size:
        last = page[-1]
        key: Any = last.position if by_position else last.created_at.isoformat()
        token = encode_token(key, last.id)
    return Page(page, token)


def encode_token(key: Any, last_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([key, last_id]).encode()).decode().rstrip("=")


def decode_token(token: str, key_type: type) -> tuple[Any, str]:
    try:
        key, last_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(key, key_type) or not isinstance(last_id, str):
            raise TypeError(key)
        if isinstance(key, str):
            datetime.fromisoformat(key)
        return key, last_id
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValidationFailed.field("page_token", "is not a token this service issued") from exc
