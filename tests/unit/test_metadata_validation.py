"""Input checks of the metadata service: page tokens, page sizes, names, slugs, texts, ids, keys."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.metadata import keys, validation
from services.metadata.domain import Cursor
from shared.errors import NotFound, ValidationFailed


def test_page_tokens_round_trip_to_the_microsecond() -> None:
    cursor = Cursor(datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC), uuid.uuid4())
    token = validation.encode_token(cursor)
    assert validation.decode_token(token) == cursor
    assert "=" not in token
    assert validation.decode_token("") == validation.FIRST


@pytest.mark.parametrize("token", ["%%%", "abc", "bm90LWEtY3Vyc29y", "MTIzLg"])
def test_tampered_page_tokens_are_invalid_page_token(token: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validation.decode_token(token)
    assert [e.field for e in caught.value.errors] == ["page_token"]


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert validation.page_size(0) == 50
    assert validation.page_size(7) == 7
    assert validation.page_size(10_000) == 200
    with pytest.raises(ValidationFailed) as caught:
        validation.page_size(-1)
    assert [e.field for e in caught.value.errors] == ["page_size"]


def test_checks_collect_every_invalid_field() -> None:
    checks = validation.Checks()
    checks.slug("slug", "ok-slug")
    checks.slug("slug", "-starts-with-dash")
    checks.text("name", "", 200)
    checks.text("text", "x" * 2001, 2000)
    checks.text("title", "nul\x00byte", 200)
    checks.user_name("name", "dev.user_1-a")
    with pytest.raises(ValidationFailed) as caught:
        checks.done()
    assert [e.field for e in caught.value.errors] == ["slug", "name", "text", "title"]


@pytest.mark.parametrize("slug", ["ab", "a1-b2", "0" * 63])
def test_valid_slugs(slug: str) -> None:
    checks = validation.Checks()
    checks.slug("slug", slug)
    checks.done()


@pytest.mark.parametrize("slug", ["a", "A1", "a_b", "-ab", "0" * 64, "ab\n"])
def test_invalid_slugs(slug: str) -> None:
    checks = validation.Checks()
    checks.slug("slug", slug)
    with pytest.raises(ValidationFailed):
        checks.done()


def test_malformed_ids_are_not_found() -> None:
    with pytest.raises(NotFound, match="no such chain"):
        validation.parse_id("not-a-uuid", "chain")
    assert validation.optional_id("", "chain") is None


def test_keys_are_random_and_only_their_hash_and_prefix_are_kept() -> None:
    first, second = keys.new_secret(), keys.new_secret()
    assert first != second and first.startswith("rf_") and len(first) == 46
    assert keys.key_hash(first) != keys.key_hash(second) and len(keys.key_hash(first)) == 32
    assert first.startswith(keys.display_prefix(first)) and len(keys.display_prefix(first)) == 10
    keys.check_chosen_secret("rf_dev_0123456789abcdef")
    for weak in ("short", "has spaces in the middle of it", "x" * 300):
        with pytest.raises(ValidationFailed):
            keys.check_chosen_secret(weak)
