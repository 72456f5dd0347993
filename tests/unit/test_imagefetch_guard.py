"""The SSRF guard: URL normalization, odd address spellings, and which addresses are refused."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from services.imagefetch.domain import BLOCKED_ADDRESS, INVALID_URL, FetchFailure
from shared.url_guard import (
    check_address,
    normalize_url,
    parse_allow_list,
    refusal,
    refused_name,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("HTTP://Example.COM:80/a/b?x=1#frag", "http://example.com/a/b?x=1"),
        ("HtTpS://Example.com:443/x.png", "https://example.com/x.png"),
        ("hTTp://example.com:8080/x.png", "http://example.com:8080/x.png"),
        ("https://example.com:443", "https://example.com/"),
        ("https://example.com:8443/p", "https://example.com:8443/p"),
        ("http://example.com./img.png", "http://example.com/img.png"),
        ("http://bücher.example/x", "http://xn--bcher-kva.example/x"),
        ("  http://example.com/a%20b  ", "http://example.com/a%20b"),
    ],
)
def test_urls_are_normalized_to_one_spelling(raw: str, normalized: str) -> None:
    assert str(normalize_url(raw)) == normalized


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0177.0.0.1",
        "0177.0000.0.01",
        "127.1",
        "127.0.1",
        "0x7f.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth digits
    ],
)
def test_odd_spellings_of_loopback_become_the_canonical_address(spelling: str) -> None:
    url = normalize_url(f"http://{spelling}/x")
    assert url.raw_host == "127.0.0.1"
    with pytest.raises(FetchFailure) as refused:
        check_address(ip_address(url.raw_host), allow=())
    assert refused.value.reason == BLOCKED_ADDRESS


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "//example.com/x.png",
        "/relative.png",
        "http:///nohost",
        "http://user:secret@example.com/x.png",
        "http://example.com@127.0.0.1/",
        "http://exa mple.com/",
        "http://example.com/a b",
        "http://ex\\ample.com/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://%31%32%37.0.0.1/",
        "http://1.2.3.4.5/",
        "http://256.1.1.1/",
        "http://1.0x1g.5/",
        "http://08.0.0.1/",
        "http://[fe80::1%25eth0]/",
        "http://-bad-.example/",
        "http://" + "a" * 9000 + ".example/",
    ],
)
def test_malformed_or_tricky_urls_are_invalid(raw: str) -> None:
    with pytest.raises(FetchFailure) as caught:
        normalize_url(raw)
    assert caught.value.reason == INVALID_URL
    assert "secret" not in caught.value.message


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",  # site-local
        "ff02::1",  # multicast
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible
        "2002:7f00:1::1",  # 6to4 around 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 around 169.254.169.254
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
        "64:ff9b::7f00:1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(FetchFailure) as refused:
        check_address(ip_address(address), allow=())
    assert refused.value.reason == BLOCKED_ADDRESS
    assert not refused.value.retryable


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("0.0.0.0", "an unspecified address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("2002:7f00:1::1", "an IPv6 address leading to a loopback address"),
        ("64:ff9b::a9fe:a9fe", "an IPv6 address leading to a cloud metadata address"),
        ("::10.0.0.1", "an IPv6 address leading to a private address"),
    ],
)
def test_a_refusal_names_the_class_of_the_address_and_never_the_address(address: str, kind: str) -> None:
    with pytest.raises(FetchFailure) as refused:
        check_address(ip_address(address), allow=())
    failure = refused.value
    assert (failure.reason, failure.message) == (
        BLOCKED_ADDRESS,
        f"the URL's host is {kind}, which is not allowed",
    )
    assert refusal(ip_address(address), allow=()) == kind
    # The address itself is for operators only.
    assert str(ip_address(address)) in failure.detail


def test_a_refusal_after_a_redirect_says_so() -> None:
    with pytest.raises(FetchFailure) as refused:
        check_address(ip_address("10.0.0.1"), allow=(), redirected=True)
    assert refused.value.message == "the origin redirected to a private address, which is not allowed"


@pytest.mark.parametrize("redirected", [False, True])
def test_a_refused_name_reads_the_same_whatever_it_resolved_to(redirected: bool) -> None:
    # Whether the name resolved at all (and to what) must not show: that would be a DNS oracle.
    failures = [
        refused_name("db.internal", redirected=redirected, detail=detail)
        for detail in ("db.internal resolved to 10.0.0.5", "db.internal did not resolve: [Errno -2]")
    ]
    assert {(f.reason, f.message, f.retryable) for f in failures} == {
        (BLOCKED_ADDRESS, failures[0].message, False)
    }
    assert "db.internal" in failures[0].message and "resolve" in failures[0].message
    assert "10.0.0.5" not in failures[0].message and "10.0.0.5" in failures[0].detail


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "2002:5db8:d822::1"])
def test_public_addresses_pass(address: str) -> None:
    check_address(ip_address(address), allow=())
    assert refusal(ip_address(address), allow=()) is None


def test_the_allow_list_admits_addresses_and_networks_and_nothing_else() -> None:
    allow = parse_allow_list(["127.0.0.1", "10.1.0.0/16", "::1"])
    assert check_address(ip_address("127.0.0.1"), allow) == ip_address("127.0.0.1")
    assert check_address(ip_address("::ffff:127.0.0.1"), allow) == ip_address("127.0.0.1")
    check_address(ip_address("10.1.200.3"), allow)
    check_address(ip_address("::1"), allow)
    for refused in ("127.0.0.2", "10.2.0.1", "169.254.169.254"):
        with pytest.raises(FetchFailure):
            check_address(ip_address(refused), allow)


def test_a_bad_allow_list_entry_is_named() -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        parse_allow_list(["127.0.0.1", "not-an-ip"])
