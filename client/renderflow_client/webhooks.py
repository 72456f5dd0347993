"""Checking a webhook Renderflow sent, as the Standard Webhooks specification defines them: an
HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}` under the secret (`whsec_` + base64),
in `webhook-signature` as `v1,<base64>` (several, space-separated, while a secret rotates).

Written here rather than taken from the `standardwebhooks` package: the check is these few lines,
and that package would bring an HTTP API client of its own and its dependencies to every user."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"


class WebhookVerificationError(Exception):
    """The webhook is not Renderflow's, was changed, or is too old (or too far in the future)."""


def verify_webhook(
    secret: str, body: bytes, headers: Mapping[str, str], *, tolerance_s: float = 300.0
) -> dict[str, Any]:
    """The event a webhook carries (`{"type", "timestamp", "data"}`), once its signature is one
    of `secret`'s and its timestamp within `tolerance_s` of now; WebhookVerificationError if not.
    Pass the body's bytes exactly as received."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        webhook_id = lowered["webhook-id"]
        timestamp = lowered["webhook-timestamp"]
        signatures = lowered["webhook-signature"]
    except KeyError as missing:
        raise WebhookVerificationError(f"the {missing.args[0]} header is missing") from None
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a number") from None
    if abs(time.time() - sent_at) > tolerance_s:
        raise WebhookVerificationError("the webhook's timestamp is too old or too new")
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for signature in signatures.split():
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            event = json.loads(body)
            if not isinstance(event, dict):
                raise WebhookVerificationError("the body is not a JSON object")
            return event
    raise WebhookVerificationError("no signature matches the secret")
