"""Safe retries of submits: the `Idempotency-Key` header and the fingerprint of a request body.

Generation keeps what a key stands for: for 24 hours a repeat of a keyed submit answers with the
render (or batch) the first one made, and the same key with another body is refused. The gateway
only reads the key and fingerprints the body.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

from shared.errors import ValidationFailed

_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def idempotency_key(request: web.Request) -> str:
    """The `Idempotency-Key` header (1..255 visible ASCII characters), or "" without one."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ""
    if not _KEY.fullmatch(key):
        raise ValidationFailed.field("Idempotency-Key", "must be 1 to 255 visible ASCII characters")
    return key


def request_hash(document: Any) -> str:
    """SHA-256 of the canonical JSON of a request: equal for equal requests."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
