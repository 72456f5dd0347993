"""What a receiver may be: an http(s) URL the SSRF guard accepts (the image fetcher's own guard, one
for every URL a user gives), and the events it may ask for.

Checked when a render names a webhook and when an endpoint is made or changed, so that a URL that
can never be delivered to is refused with a clear error before anything is queued: an address
written in any of its odd spellings (`2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`) is read as the
address it is, and `localhost` names are loopback. A name is resolved only at delivery, where the
image fetcher checks every address it connects to (DNS pinned), so a name that later resolves to a
private address is refused then (`blocked_address`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from services.generation.domain import WEBHOOK_EVENTS, RenderSpec, Webhook
from shared.contract import MAX_URL
from shared.errors import ValidationFailed
from shared.url_guard import FetchFailure, Network, normalize_url, parse_ip, refusal

_LOOPBACK = IPv4Address("127.0.0.1")


def receiver_url(raw: str, allow: Sequence[Network]) -> str:
    """The URL in its canonical form; ValueError saying what is wrong (never an address)."""
    if len(raw) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters")
    try:
        url = normalize_url(raw)
    except FetchFailure as exc:
        raise ValueError(f"must be an absolute http or https URL: {exc.message}") from None
    host = url.host or ""
    address = parse_ip(host)
    if address is None and (host == "localhost" or host.endswith(".localhost")):
        address = _LOOPBACK  # RFC 6761: such names are loopback whatever a resolver says
    if address is not None and (kind := refusal(address, allow)) is not None:
        raise ValueError(f"must be on a public address, not {kind}")
    return str(url)


def receiver_events(given: Iterable[str]) -> tuple[str, ...]:
    """The events asked for, each once, in their natural order (none: `completed`); ValueError
    naming an unknown one."""
    chosen = set(given)
    unknown = sorted(chosen - set(WEBHOOK_EVENTS))
    if unknown:
        raise ValueError(f"must be among {', '.join(WEBHOOK_EVENTS)}; not {', '.join(unknown)}")
    return tuple(event for event in WEBHOOK_EVENTS if event in chosen) or ("completed",)


@dataclass(frozen=True)
class Receivers:
    """The check of the receivers renders name, with the private addresses allowed."""

    allow: tuple[Network, ...] = ()

    def applied(self, spec: RenderSpec, prefix: str = "") -> RenderSpec:
        """`spec` with its webhook checked and in canonical form; ValidationFailed naming the field
        (after `prefix`, e.g. `items[3].`)."""
        if spec.webhook is None:
            return spec
        try:
            url = receiver_url(spec.webhook.url, self.allow)
        except ValueError as exc:
            raise ValidationFailed.field(f"{prefix}webhook.url", str(exc)) from None
        try:
            events = receiver_events(spec.webhook.events)
        except ValueError as exc:
            raise ValidationFailed.field(f"{prefix}webhook.events", str(exc)) from None
        return replace(spec, webhook=Webhook(url, events))
