"""API key secrets: how they are made, hashed for storage, and shown to people."""

from __future__ import annotations

import hashlib
import secrets

from shared.errors import ValidationFailed

KEY_PREFIX = "rf_"
# Enough of the key for a person to tell keys apart, far too little to guess the rest.
DISPLAY_CHARS = 10
MIN_KEY_CHARS = 20
MAX_KEY_CHARS = 256


def new_secret() -> str:
    """A fresh random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(secret: str) -> bytes:
    """What is stored in place of the key: its SHA-256 (a random 256-bit key needs no slow hash)."""
    return hashlib.sha256(secret.encode()).digest()


def display_prefix(secret: str) -> str:
    """The first characters of a key, shown in lists."""
    return secret[:DISPLAY_CHARS]


def check_chosen_secret(secret: str) -> None:
    """Refuses a caller-chosen key (the development key) that is too short to be a secret."""
    if not MIN_KEY_CHARS <= len(secret) <= MAX_KEY_CHARS or not secret.isascii() or not secret.isprintable():
        raise ValidationFailed.field(
            "api_key", f"must be {MIN_KEY_CHARS} to {MAX_KEY_CHARS} printable ASCII characters"
        )
    if any(c.isspace() for c in secret):
        raise ValidationFailed.field("api_key", "must not contain spaces")
