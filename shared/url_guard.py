"""The SSRF guard of every request to a user-given URL (reference images, webhook receivers): which
URLs may be fetched and which addresses may be connected to (pure, no I/O), and how such a request
fails.

A URL is normalized once (scheme and host lowercased, default port and fragment dropped, odd
spellings of an IPv4 address such as `2130706433`, `0x7f000001`, `0177.0.0.1` or `127.1` and
IPv4-mapped IPv6 rewritten to the canonical address), so that the address checked is the address
connected to and one resource has one cache key. An address is refused unless it is a public
unicast address (addresses embedded in 6to4, Teredo, NAT64 and IPv4-compatible IPv6 are checked
too) or it lies in the allow-list.

A refusal tells the caller what class of address was refused (loopback, private, cloud metadata,
...) but never the address, and a refused host name reads the same whether it did not resolve or
resolved to non-public addresses: anything more would let a tenant map the internal network
through error messages. The full story goes in the failure's `detail`, for operators only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from yarl import URL

from shared.settings import ConfigError, Env

# Failure reasons (besides `http_<status>`), exactly as a render's error carries them.
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
NOT_AN_IMAGE = "not_an_image"
BLOCKED_ADDRESS = "blocked_address"
CONNECTION_FAILED = "connection_failed"
TOO_MANY_REDIRECTS = "too_many_redirects"
INVALID_URL = "invalid_url"

# Delivery outcomes besides `http_<status>` and the failure reasons timeout, connection_failed,
# blocked_address and invalid_url above, exactly as a webhook's delivery log carries them.
DELIVERED = "delivered"
REDIRECT_NOT_FOLLOWED = "redirect_not_followed"


class FetchFailure(Exception):
    """A fetch failed for a reason of the origin or the URL (not of the service itself).

    `reason` is one of the constants above or `http_<status>`; `message` is for people and never
    holds credentials or query strings from the URL, nor internal addresses or whether a name
    resolved; `retry_after` is the origin's own hint. `detail` is for operators only (the service's
    log and trace): it may name resolved addresses and resolver errors, so it never leaves the
    service.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail

    @classmethod
    def http(cls, status: int, retry_after: float | None = None) -> FetchFailure:
        """The origin answered `status`; 408, 429 and 5xx are worth trying again."""
        retryable = status in (408, 429) or status >= 500
        return cls(
            f"http_{status}",
            f"the origin answered HTTP {status}",
            retryable=retryable,
            retry_after=retry_after,
        )

    @classmethod
    def timed_out(cls, message: str = "the image did not arrive before the deadline") -> FetchFailure:
        """The deadline passed first; another try, with more time, may succeed."""
        return cls(TIMEOUT, message, retryable=True)

    def __repr__(self) -> str:
        return f"FetchFailure({self.reason!r}, {self.message!r})"


Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

MAX_URL_LENGTH = 8192
_SCHEMES = {"http": 80, "https": 443}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMBER = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_NAT64 = IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = IPv6Network("::/96")
# Instance metadata services (AWS, GCP, Azure, OpenStack; AWS over IPv6; Alibaba Cloud): named as
# such in refusals, as that is the address an SSRF is usually after.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


def parse_allow_list(items: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDR networks (`127.0.0.1`, `10.0.0.0/8`, `::1`); ValueError names a bad one."""
    networks: list[Network] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or network: {item!r}") from None
    return tuple(networks)


def allow_list(env: Env) -> tuple[Network, ...]:
    """The private addresses user-given URLs may reach (RENDERFLOW_IMAGEFETCH_ALLOW, read by every
    process that checks such URLs); ConfigError names a bad entry."""
    try:
        return parse_allow_list(env.list("RENDERFLOW_IMAGEFETCH_ALLOW"))
    except ValueError as exc:
        raise ConfigError(f"RENDERFLOW_IMAGEFETCH_ALLOW: {exc}") from None


def normalize_url(raw: str) -> URL:
    """The canonical form of an http(s) URL, or FetchFailure(invalid_url) saying what is wrong."""
    raw = raw.strip()
    if not raw:
        raise _invalid("the URL is empty")
    if len(raw) > MAX_URL_LENGTH:
        raise _invalid(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if _FORBIDDEN_CHARS.search(raw):
        raise _invalid("the URL contains spaces, control characters or backslashes")
    try:
        url = URL(raw)
        port = url.explicit_port
    except (ValueError, UnicodeError):
        raise _invalid("the URL cannot be parsed") from None
    if url.scheme not in _SCHEMES:
        raise _invalid("only http and https URLs are fetched")
    if not url.is_absolute() or not url.raw_host:
        raise _invalid("the URL has no host")
    if url.raw_user is not None or url.raw_password is not None:
        raise _invalid("URLs with credentials are not fetched")
    if port == 0:
        raise _invalid("port 0 is not a port")
    host = canonical_host(url.raw_host)
    return URL.build(
        scheme=url.scheme,
        host=f"[{host}]" if ":" in host else host,
        port=None if port == _SCHEMES[url.scheme] else port,
        path=url.raw_path or "/",
        query_string=url.raw_query_string,
        encoded=True,
    )


def canonical_host(host: str) -> str:
    """A host name in lowercase without its trailing dot, or an IP address in its one canonical
    spelling; FetchFailure(invalid_url) for anything else."""
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if ":" in host:
        try:
            v6 = IPv6Address(host)
        except ValueError:
            raise _invalid("the host is not a valid IPv6 address") from None
        if v6.scope_id is not None:
            raise _invalid("IPv6 zone identifiers are not allowed")
        return str(v6.ipv4_mapped or v6)
    labels = host.split(".")
    if _NUMBER.match(labels[-1]):
        # A host ending in a number is an IPv4 address in some spelling (as browsers and
        # inet_aton read it), never a DNS name.
        v4 = parse_ipv4(host)
        if v4 is None:
            raise _invalid("the host looks like an IPv4 address but is not a valid one")
        return str(v4)
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise _invalid("the host is not a valid host name")
    return host


def parse_ipv4(host: str) -> IPv4Address | None:
    """An IPv4 address written the way inet_aton accepts it (1 to 4 parts, each decimal, 0x-hex or
    0-octal, the last filling the remaining bytes), or None."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        try:
            if part.startswith("0x"):
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part[1:], 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:
            return None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return IPv4Address(value)


def parse_ip(host: str) -> Address | None:
    """The address a canonical host stands for, or None if it is a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_address(address: Address, allow: Iterable[Network], *, redirected: bool = False) -> Address:
    """`address` if it may be connected to (IPv4-mapped forms unwrapped); else
    FetchFailure(blocked_address) naming the class of the address, not the address itself (as a
    URL's host, or as where the origin `redirected` to)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    kind = refusal(address, allow)
    if kind is None:
        return address
    where = "the origin redirected to" if redirected else "the URL's host is"
    raise FetchFailure(
        BLOCKED_ADDRESS, f"{where} {kind}, which is not allowed", detail=f"{address} is {kind}"
    )


def refused_name(host: str, *, redirected: bool = False, detail: str) -> FetchFailure:
    """The failure for a host name that did not resolve, or resolved to any address that may not be
    connected to. The one text for all of these, so that it does not tell an internal name from a
    name that does not exist; `detail` (what it resolved to, or the resolver's error) is for
    operators only."""
    where = f"the origin redirected to {host}, which" if redirected else f"the host {host}"
    message = f"{where} does not resolve, or not only to public addresses"
    return FetchFailure(BLOCKED_ADDRESS, message, detail=detail)


def refusal(address: Address, allow: Iterable[Network]) -> str | None:
    """None if `address` may be connected to; else what it is, by class and never by value
    ("a loopback address", "an IPv6 address leading to a private address", ...)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address.version == net.version and address in net for net in allow):
        return None
    own = None if _is_public(address) else address_class(address)
    # Where a public or merely reserved IPv6 address leads says more than its own class (NAT64 and
    # IPv4-compatible addresses are "reserved" themselves); `::1` is still loopback.
    if own in (None, "reserved"):
        for inner in _embedded_ipv4(address):
            if not _is_public(inner):
                return f"an IPv6 address leading to {_with_article(address_class(inner))}"
    return None if own is None else _with_article(own)


def address_class(address: Address) -> str:
    """The class of a non-public address, as refusals name it: cloud metadata, unspecified,
    loopback, link-local, multicast, site-local, shared (carrier-grade NAT), reserved, private."""
    if address in _METADATA:
        return "cloud metadata"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, IPv6Address) and address.is_site_local:
        return "site-local"
    if address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    return "non-public"


def _with_article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


def _is_public(address: Address) -> bool:
    # is_global alone lets multicast, site-local and some reserved ranges through.
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_private
        and not (isinstance(address, IPv6Address) and address.is_site_local)
    )


def _embedded_ipv4(address: Address) -> list[IPv4Address]:
    """IPv4 addresses a packet to this IPv6 address may end up at (tunnels and translators)."""
    if isinstance(address, IPv4Address):
        return []
    embedded: list[IPv4Address] = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        embedded.append(IPv4Address(int(address) & 0xFFFFFFFF))
    return embedded


def _invalid(message: str) -> FetchFailure:
    return FetchFailure(INVALID_URL, message)
