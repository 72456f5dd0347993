"""Fetching from a misbehaving origin: each misbehaviour ends in its typed reason within the deadline,
transient failures heal, and nothing private is reached unless allow-listed."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest

from services.imagefetch.config import Settings
from services.imagefetch.domain import FetchFailure, FetchOrder, FetchOutcome
from services.imagefetch.service import ImageService, open_service
from shared.url_guard import parse_allow_list
from tests.support.origin import Origin

DEADLINE_S = 1.0
SLACK_S = 0.3  # scheduling noise on a busy 2-core machine
LOOPBACK = parse_allow_list(["127.0.0.1"])
TEST_SETTINGS = Settings(
    allow=LOOPBACK,
    deadline_s=DEADLINE_S,
    connect_timeout_s=0.5,
    read_timeout_s=0.4,
    backoff_initial_s=0.05,
    backoff_max_s=0.1,
    retry_after_cap_s=1.0,
    max_bytes=256 * 1024,
)

OpenService = Callable[..., Awaitable[ImageService]]


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin() as origin:
        yield origin


@pytest.fixture
async def open_fetcher() -> AsyncIterator[OpenService]:
    """Opens services with the test settings changed by keyword; all closed after the test."""
    async with AsyncExitStack() as stack:

        async def open_(**overrides: Any) -> ImageService:
            return await stack.enter_async_context(open_service(replace(TEST_SETTINGS, **overrides)))

        yield open_


async def _timed(service: ImageService, url: str, **order: Any) -> tuple[FetchOutcome, float]:
    started = time.monotonic()
    outcome = await service.fetch(FetchOrder(url, **order))
    return outcome, time.monotonic() - started


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/hang-headers", "timeout"),
        ("/hang-body", "timeout"),
        ("/drip", "timeout"),
        ("/status/404", "http_404"),
        ("/status/403", "http_403"),
        ("/status/500", "http_500"),
        ("/redirect/4/chain", "too_many_redirects"),
        ("/loop", "too_many_redirects"),
        ("/redirect-to?location=http://169.254.169.254/latest/meta-data/", "blocked_address"),
        ("/redirect-to?location=http://10.0.0.1/x.png", "blocked_address"),
        ("/redirect-to?location=http://0x7f000002/x.png", "blocked_address"),
        ("/redirect-to?location=http://nonexistent.invalid/x.png", "blocked_address"),
        ("/redirect-to?location=ftp://example.com/x.png", "invalid_url"),
        ("/big?size=300000&length=1", "too_large"),
        ("/big?size=300000", "too_large"),
        ("/html-as-png", "not_an_image"),
        ("/truncated.png", "not_an_image"),
        ("/reset", "connection_failed"),
    ],
)
async def test_each_misbehaviour_gives_its_reason_within_the_deadline(
    origin: Origin, open_fetcher: OpenService, path: str, reason: str
) -> None:
    service = await open_fetcher()
    outcome, elapsed = await _timed(service, origin.url(path))
    assert outcome.image is None and outcome.failure is not None
    assert outcome.failure.reason == reason, outcome.failure.message
    assert elapsed <= DEADLINE_S + SLACK_S


async def test_a_slow_drip_is_cut_at_the_deadline_even_with_a_long_read_timeout(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher(read_timeout_s=30.0, deadline_s=0.6)
    for path in ("/drip", "/hang-headers"):
        outcome, elapsed = await _timed(service, origin.url(path))
        assert outcome.failure is not None and outcome.failure.reason == "timeout"
        assert outcome.failure.retryable
        assert 0.6 <= elapsed <= 0.6 + SLACK_S


async def test_a_shorter_caller_deadline_wins(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(deadline_s=5.0)
    outcome, elapsed = await _timed(service, origin.url("/hang-headers"), deadline_s=0.3)
    assert outcome.failure is not None and outcome.failure.reason == "timeout"
    assert elapsed <= 0.3 + SLACK_S


async def test_client_errors_are_not_retried_and_server_errors_are(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    missing, _ = await _timed(service, origin.url("/status/403"))
    assert missing.attempts == 1 and origin.hits["/status/403"] == 1
    assert missing.failure is not None and not missing.failure.retryable
    broken, _ = await _timed(service, origin.url("/status/500"))
    assert broken.attempts == 3 and origin.hits["/status/500"] == 3
    assert broken.failure is not None and broken.failure.retryable
    for status in (408, 429):
        outcome, _ = await _timed(service, origin.url(f"/status/{status}"))
        assert outcome.attempts == 3, status


async def test_500_then_200_heals(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/flaky/a"))
    assert outcome.image is not None and outcome.image.data == origin.image
    assert outcome.attempts == 2
    assert origin.hits["/flaky/a"] == 2


async def test_503_with_retry_after_is_waited_for(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(deadline_s=2.5)
    outcome, elapsed = await _timed(service, origin.url("/unavailable/a?after=1"))
    assert outcome.image is not None
    assert outcome.attempts == 2
    assert 1.0 <= elapsed <= 1.0 + SLACK_S


async def test_retry_after_is_capped(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(deadline_s=2.0, retry_after_cap_s=0.2)
    outcome, elapsed = await _timed(service, origin.url("/unavailable/b?after=3600"))
    assert outcome.image is not None
    assert 0.2 <= elapsed <= 0.2 + SLACK_S


async def test_a_wait_that_would_pass_the_deadline_is_not_started(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher(deadline_s=0.8)
    outcome, elapsed = await _timed(service, origin.url("/unavailable/c?after=1&always=1"))
    assert outcome.failure is not None and outcome.failure.reason == "http_503"
    assert outcome.attempts == 1
    assert elapsed < 0.3


async def test_a_chain_of_301_and_302_is_followed(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/redirect/3/chain"))
    assert outcome.image is not None
    assert outcome.image.final_url == origin.url("/redirect/0/chain")
    assert (outcome.image.content_type, outcome.image.width, outcome.image.height) == ("image/png", 8, 6)


async def test_an_image_under_the_cap_arrives_whole(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/image/big?big=1"))
    assert outcome.image is not None and outcome.image.data == origin.big_image
    assert outcome.image.size_bytes == len(origin.big_image)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]"],
)
async def test_without_the_allow_list_loopback_is_refused_before_any_connection(
    origin: Origin, open_fetcher: OpenService, host: str
) -> None:
    service = await open_fetcher(allow=())
    outcome, elapsed = await _timed(service, f"http://{host}:{origin.port}/image/a")
    assert outcome.failure is not None and outcome.failure.reason == "blocked_address"
    assert not outcome.failure.retryable
    assert origin.requests == 0
    assert elapsed < 0.5


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.png",
        "http://192.168.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/x.png",
        "http://[::1]/x.png",
        "http://0.0.0.0/x.png",
    ],
)
async def test_private_addresses_are_refused_at_once(open_fetcher: OpenService, url: str) -> None:
    service = await open_fetcher(allow=())
    outcome, _ = await _timed(service, url)
    assert outcome.failure is not None and outcome.failure.reason == "blocked_address"
    assert outcome.attempts == 1  # refused, not retried: a blocked address stays blocked


async def test_an_allow_list_entry_admits_only_itself(origin: Origin, open_fetcher: OpenService) -> None:
    service = await open_fetcher(allow=parse_allow_list(["127.0.0.2"]))
    outcome, _ = await _timed(service, origin.url("/image/a"))
    assert outcome.failure is not None and outcome.failure.reason == "blocked_address"
    assert origin.requests == 0


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x.png", "not a url", "", "http://user:secret@example.com/x.png"]
)
async def test_invalid_urls_are_refused_without_leaking_credentials(
    open_fetcher: OpenService, url: str
) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, url)
    assert outcome.failure is not None and outcome.failure.reason == "invalid_url"
    assert "secret" not in outcome.failure.message


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.1/x.png", "a private address"),
        ("http://0x7f000001/x.png", "a loopback address"),
        ("http://[::1]/x.png", "a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ],
)
async def test_a_refused_address_is_named_by_its_class_not_by_itself(
    open_fetcher: OpenService, url: str, kind: str
) -> None:
    service = await open_fetcher(allow=())
    outcome, _ = await _timed(service, url)
    assert outcome.failure is not None and outcome.failure.reason == "blocked_address"
    assert outcome.failure.message == f"the URL's host is {kind}, which is not allowed"


async def test_a_redirect_to_a_refused_address_names_only_its_class(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/redirect-to?location=http://10.9.8.7/x.png"))
    assert outcome.failure is not None and outcome.failure.reason == "blocked_address"
    assert outcome.failure.message == "the origin redirected to a private address, which is not allowed"


def _as_seen_by_the_caller(failure: FetchFailure | None, host: str) -> tuple[str, str, bool]:
    assert failure is not None
    return failure.reason, failure.message.replace(host, "<host>"), failure.retryable


async def test_a_name_for_loopback_and_a_name_that_does_not_resolve_look_alike(
    origin: Origin, open_fetcher: OpenService, caplog: pytest.LogCaptureFixture
) -> None:
    service = await open_fetcher(allow=())
    caplog.set_level(logging.INFO, logger="services.imagefetch")
    local, _ = await _timed(service, f"http://localhost:{origin.port}/image/a")
    missing, _ = await _timed(service, "http://nonexistent.invalid/image/a")
    assert _as_seen_by_the_caller(local.failure, "localhost") == (
        "blocked_address",
        "the host <host> does not resolve, or not only to public addresses",
        False,
    )
    assert _as_seen_by_the_caller(missing.failure, "nonexistent.invalid") == _as_seen_by_the_caller(
        local.failure, "localhost"
    )
    assert origin.requests == 0
    # Operators still see what happened, in the log.
    details = {getattr(r, "host", None): getattr(r, "detail", "") for r in caplog.records}
    assert "127.0.0.1" in details["localhost"]
    assert "did not resolve" in details["nonexistent.invalid"]


async def test_a_redirect_to_an_invalid_url_says_the_url_was_the_origins(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/redirect-to?location=ftp://example.com/x.png"))
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.message) == (
        "invalid_url",
        "the origin redirected to an invalid URL (only http and https URLs are fetched)",
    )


async def test_a_redirect_to_a_name_that_does_not_resolve_reads_like_any_refused_name(
    origin: Origin, open_fetcher: OpenService
) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url("/redirect-to?location=http://nonexistent.invalid/x.png"))
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.message) == (
        "blocked_address",
        "the origin redirected to nonexistent.invalid, which does not resolve,"
        " or not only to public addresses",
    )


def _answers(*addresses: str) -> list[tuple[Any, ...]]:
    return [
        (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, 80))
        for a in addresses
    ]


@pytest.mark.parametrize(
    "answer",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        _answers("10.0.0.5"),
        _answers("93.184.216.34", "10.0.0.5"),
        _answers("fd00::5"),
        [],
    ],
    ids=["nxdomain", "resolver-busy", "private", "public-and-private", "private-v6", "empty"],
)
async def test_whatever_a_refused_name_resolves_to_the_caller_sees_the_same(
    open_fetcher: OpenService, monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        assert host == "probe.example"
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    service = await open_fetcher(allow=())
    outcome, _ = await _timed(service, "http://probe.example/x.png")
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.message, outcome.failure.retryable) == (
        "blocked_address",
        "the host probe.example does not resolve, or not only to public addresses",
        False,
    )
    # What it did resolve to is for operators (the log and the span) only.
    for address in [info[4][0] for info in answer] if isinstance(answer, list) else []:
        assert address in outcome.failure.detail


async def test_a_resolver_that_fails_for_now_is_asked_again_within_the_fetch(
    open_fetcher: OpenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = 0

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        nonlocal asked
        asked += 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    service = await open_fetcher(allow=())
    outcome, _ = await _timed(service, "http://probe.example/x.png")
    assert asked == outcome.attempts == TEST_SETTINGS.max_attempts
    assert outcome.failure is not None and not outcome.failure.retryable


@pytest.mark.parametrize("scheme", ["HTTP", "Http", "hTtP"])
async def test_the_scheme_is_read_in_any_case(origin: Origin, open_fetcher: OpenService, scheme: str) -> None:
    service = await open_fetcher()
    outcome, _ = await _timed(service, origin.url(f"/image/{scheme}").replace("http", scheme, 1))
    assert outcome.image is not None and outcome.image.data == origin.image
    redirected, _ = await _timed(
        service, origin.url(f"/redirect-to?location={scheme}://127.0.0.1:{origin.port}/image/r{scheme}")
    )
    assert redirected.image is not None
