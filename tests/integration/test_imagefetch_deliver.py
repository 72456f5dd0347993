"""Webhook deliveries (ImageFetchService.Deliver) to a real receiver: what arrives, what each answer
or misbehaviour becomes, one attempt within its timeout, the answer read only so far, and nothing
sent where a fetch could not go; then the RPC, its spans, metrics and log lines."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import SpanKind
from renderflow.v1 import imagefetch_pb2, imagefetch_pb2_grpc

from services.imagefetch.config import Settings
from services.imagefetch.delivery import EXCERPT_BYTES, Deliverer
from services.imagefetch.domain import Delivery, DeliveryOrder
from services.imagefetch.server import running
from shared.errors import Unavailable, ValidationFailed
from shared.grpc_client import create_channel
from shared.rpc_errors import rpc_errors
from shared.url_guard import parse_allow_list
from tests.support import eventually, serve_on_loopback
from tests.support.recorded import Recorded

if TYPE_CHECKING:
    from renderflow.v1.imagefetch_pb2_grpc import ImageFetchServiceAsyncStub as Stub

SLACK_S = 0.3  # scheduling noise on a busy 2-core machine
LOOPBACK = parse_allow_list(["127.0.0.1"])
TEST_SETTINGS = Settings(listen="127.0.0.1:0", allow=LOOPBACK, deliver_timeout_s=1.0, drain_grace_s=0.5)

OpenDeliverer = Callable[..., Awaitable[Deliverer]]


# The receiver.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes


class Receiver:
    """A webhook receiver: a real aiohttp server on 127.0.0.1 that records every request and answers
    as its path says, well or badly. `received` lists the requests in order of arrival, `hits[path]`
    counts them by path, `max_active` is the most served at once.

    | path | behaviour |
    | --- | --- |
    | `/status/{code}[/...]` | that status; see below |
    | `/hang` | never answers (until the receiver closes) |
    | `/flood` | 200 and a chunked body without end, until the client goes away |
    | `/reset` | resets the connection (RST) without answering |
    | anything else | 204 |

    `/status/...` takes `?text=T` (the body), `?retry_after=V` (a Retry-After), `?location=L` (a
    Location) and `?delay=S` (answers after S seconds).
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def requests(self) -> int:
        """Requests received, all paths together."""
        return len(self.received)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def start(self) -> Receiver:
        app = web.Application(middlewares=[self._record])
        routes: dict[str, Handler] = {
            "/status/{code}": self._status,
            "/status/{code}/{tail:.*}": self._status,
            "/hang": self._hang,
            "/flood": self._flood,
            "/reset": self._reset,
            "/{tail:.*}": self._no_content,
        }
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def close(self) -> None:
        self._released.set()  # hanging handlers return now
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(request.method, request.path, request.query_string, CIMultiDict(request.headers), body)
        )
        self.hits[request.path] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await handler(request)
        finally:
            self.active -= 1

    async def _status(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if "delay" in query:
            await asyncio.sleep(float(query["delay"]))
        headers = {}
        if "retry_after" in query:
            headers["Retry-After"] = query["retry_after"]
        if "location" in query:
            headers["Location"] = query["location"]
        return web.Response(status=int(request.match_info["code"]), text=query.get("text"), headers=headers)

    async def _hang(self, request: web.Request) -> web.StreamResponse:
        await self._released.wait()
        return web.Response(status=503)

    async def _flood(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"x" * 65536
        while not self._released.is_set():
            await response.write(chunk)  # raises, or the handler is cancelled, once the client is gone
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        await self._released.wait()  # cancelled at once: the client is gone
        return web.Response()

    async def _no_content(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as receiver:
        yield receiver


@pytest.fixture
async def open_deliverer() -> AsyncIterator[OpenDeliverer]:
    """Opens deliverers with the test settings changed by keyword; all closed after the test."""
    async with AsyncExitStack() as stack:

        async def open_(**overrides: Any) -> Deliverer:
            return await stack.enter_async_context(Deliverer.open(replace(TEST_SETTINGS, **overrides)))

        yield open_


@pytest.fixture
async def deliverer(open_deliverer: OpenDeliverer) -> Deliverer:
    return await open_deliverer()


async def _timed(
    deliverer: Deliverer,
    url: str,
    body: bytes = b"{}",
    timeout_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[Delivery, float]:
    started = time.monotonic()
    delivery = await deliverer.deliver(DeliveryOrder(url, headers or {}, body, timeout_s))
    return delivery, time.monotonic() - started


# What arrives.


async def test_the_body_and_headers_arrive_as_given(deliverer: Deliverer, receiver: Receiver) -> None:
    body = '{"type":"render.succeeded","data":{"prompt":"ünïcode ☃"}}'.encode()
    headers = {
        "Content-Type": "application/json",
        "webhook-id": "msg_2b3c",
        "webhook-timestamp": "1767225600",
        "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
    }
    delivery = await deliverer.deliver(
        DeliveryOrder(receiver.url("/status/200?text=thanks&hook=7"), headers, body)
    )
    assert (delivery.outcome, delivery.status, delivery.response_excerpt) == ("delivered", 200, "thanks")
    assert delivery.message == "the receiver answered HTTP 200"
    assert delivery.retry_after_s == 0 and delivery.latency_ms > 0
    [got] = receiver.received
    assert (got.method, got.path, got.query, got.body) == ("POST", "/status/200", "text=thanks&hook=7", body)
    assert {name: got.headers[name] for name in headers} == headers
    assert got.headers["User-Agent"] == "renderflow-webhooks/0.1"
    assert got.headers["Content-Length"] == str(len(body))
    assert "traceparent" not in got.headers  # our trace context is not a receiver's business


async def test_the_callers_user_agent_wins(deliverer: Deliverer, receiver: Receiver) -> None:
    delivery, _ = await _timed(deliverer, receiver.url("/"), headers={"user-agent": "Acme-Hooks/2"})
    assert (delivery.outcome, delivery.status) == ("delivered", 204)
    assert receiver.received[0].headers.getall("User-Agent") == ["Acme-Hooks/2"]


# What each answer becomes.


@pytest.mark.parametrize("status", [500, 410, 400, 404])
async def test_an_error_answer_gives_its_status_and_the_start_of_its_body(
    deliverer: Deliverer, receiver: Receiver, status: int
) -> None:
    delivery, _ = await _timed(deliverer, receiver.url(f"/status/{status}?text=went+wrong"))
    assert (delivery.outcome, delivery.status) == (f"http_{status}", status)
    assert (delivery.response_excerpt, delivery.retry_after_s) == ("went wrong", 0)
    assert delivery.message == f"the receiver answered HTTP {status}"
    assert receiver.requests == 1  # one attempt: the caller retries


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 7.0), (503, "120", 120.0), (500, "7", 0.0), (429, "soon", 0.0), (429, None, 0.0)],
)
async def test_a_retry_after_is_read_from_a_429_or_503(
    deliverer: Deliverer, receiver: Receiver, status: int, retry_after: str | None, expected: float
) -> None:
    query = "" if retry_after is None else f"?retry_after={retry_after}"
    delivery, _ = await _timed(deliverer, receiver.url(f"/status/{status}{query}"))
    assert (delivery.outcome, delivery.retry_after_s) == (f"http_{status}", expected)


async def test_a_retry_after_may_be_a_date(deliverer: Deliverer, receiver: Receiver) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    delivery, _ = await _timed(deliverer, receiver.url(f"/status/503?retry_after={quote(when)}"))
    assert delivery.outcome == "http_503" and 25 <= delivery.retry_after_s <= 30


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("where", ["/landing", "http://127.0.0.1:{port}/landing", "http://10.1.2.3/x"])
async def test_a_redirect_is_an_answer_and_is_not_followed(
    deliverer: Deliverer, receiver: Receiver, status: int, where: str
) -> None:
    location = where.format(port=receiver.port)
    delivery, _ = await _timed(deliverer, receiver.url(f"/status/{status}?location={location}"))
    assert (delivery.outcome, delivery.status) == ("redirect_not_followed", status)
    assert delivery.message == f"the receiver answered HTTP {status}, a redirect, which is not followed"
    assert receiver.hits["/landing"] == 0 and receiver.requests == 1
    # Where it pointed is for operators, by scheme and host only.
    assert delivery.detail in ("it pointed to http://127.0.0.1", "it pointed to http://10.1.2.3")


async def test_a_receiver_that_does_not_answer_is_a_timeout_within_the_timeout(
    deliverer: Deliverer, receiver: Receiver
) -> None:
    delivery, elapsed = await _timed(deliverer, receiver.url("/hang"), timeout_s=0.3)
    assert (delivery.outcome, delivery.status) == ("timeout", 0)
    assert delivery.message == "the receiver did not answer within 0.3 s"
    assert 0.3 <= elapsed <= 0.3 + SLACK_S
    assert receiver.requests == 1


async def test_the_default_timeout_is_the_setting(open_deliverer: OpenDeliverer, receiver: Receiver) -> None:
    deliverer = await open_deliverer(deliver_timeout_s=0.2)
    delivery, elapsed = await _timed(deliverer, receiver.url("/hang"))
    assert delivery.outcome == "timeout" and 0.2 <= elapsed <= 0.2 + SLACK_S


async def test_a_timeout_asked_for_is_capped_by_the_longest_deadline(
    open_deliverer: OpenDeliverer,
) -> None:
    deliverer = await open_deliverer(max_deadline_s=0.25)
    assert deliverer.timeout_for(DeliveryOrder("http://x/", {}, b"", 60.0)) == 0.25
    assert deliverer.timeout_for(DeliveryOrder("http://x/", {}, b"", 60.0), budget_s=0.1) == 0.1
    assert deliverer.timeout_for(DeliveryOrder("http://x/", {}, b"")) == TEST_SETTINGS.deliver_timeout_s


async def test_an_answer_without_end_is_read_only_so_far(deliverer: Deliverer, receiver: Receiver) -> None:
    delivery, elapsed = await _timed(deliverer, receiver.url("/flood"), timeout_s=5.0)
    assert (delivery.outcome, delivery.status) == ("delivered", 200)
    assert delivery.response_excerpt == "x" * EXCERPT_BYTES
    assert elapsed < 0.5
    await eventually(lambda: receiver.active == 0, timeout_s=2.0)  # the connection was closed


async def test_the_excerpt_does_not_end_in_half_a_character(deliverer: Deliverer, receiver: Receiver) -> None:
    delivery, _ = await _timed(deliverer, receiver.url(f"/status/500?text={'é' * 600}"))
    assert delivery.response_excerpt == "é" * (EXCERPT_BYTES // 2)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_refused_or_reset_connection_failed(
    deliverer: Deliverer, receiver: Receiver, refusing_port: int
) -> None:
    refused, _ = await _timed(deliverer, f"http://127.0.0.1:{refusing_port}/hook")
    reset, _ = await _timed(deliverer, receiver.url("/reset"))
    for delivery in (refused, reset):
        assert (delivery.outcome, delivery.status) == ("connection_failed", 0)
        assert delivery.message.startswith("the connection failed (")
        assert "127.0.0.1" not in delivery.message


async def test_deliveries_beyond_the_concurrency_wait_their_turn(
    open_deliverer: OpenDeliverer, receiver: Receiver
) -> None:
    deliverer = await open_deliverer(deliver_concurrency=2)
    url = receiver.url("/status/204?delay=0.1")
    results = await asyncio.gather(*(_timed(deliverer, url) for _ in range(4)))
    assert [d.outcome for d, _ in results] == ["delivered"] * 4
    assert receiver.max_active == 2


async def test_a_slot_that_does_not_free_up_in_time_is_the_services_fault(
    open_deliverer: OpenDeliverer, receiver: Receiver
) -> None:
    deliverer = await open_deliverer(deliver_concurrency=1)
    hanging = asyncio.create_task(_timed(deliverer, receiver.url("/hang"), timeout_s=0.5))
    await eventually(lambda: receiver.requests == 1)
    with pytest.raises(Unavailable):
        await deliverer.deliver(DeliveryOrder(receiver.url("/"), {}, b""), budget_s=0.1)
    assert (await hanging)[0].outcome == "timeout"
    assert receiver.requests == 1


# Nothing sent where a fetch could not go.


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[::1]"],
)
async def test_without_the_allow_list_loopback_is_refused_before_any_connection(
    open_deliverer: OpenDeliverer, receiver: Receiver, host: str
) -> None:
    deliverer = await open_deliverer(allow=())
    delivery, elapsed = await _timed(deliverer, receiver.url("/hook", host=host))
    assert (delivery.outcome, delivery.status) == ("blocked_address", 0)
    assert delivery.message == "the URL's host is a loopback address, which is not allowed"
    assert receiver.requests == 0 and elapsed < 0.5


@pytest.mark.parametrize("host", ["localhost", "localhost.", "LocalHost"])
async def test_a_name_for_loopback_is_refused_like_a_name_that_does_not_resolve(
    open_deliverer: OpenDeliverer, receiver: Receiver, host: str
) -> None:
    deliverer = await open_deliverer(allow=())
    local, _ = await _timed(deliverer, receiver.url("/hook", host=host))
    missing, _ = await _timed(deliverer, "http://nonexistent.invalid/hook")
    assert (local.outcome, local.message) == (
        "blocked_address",
        "the host localhost does not resolve, or not only to public addresses",
    )
    assert (missing.outcome, missing.message) == (
        "blocked_address",
        "the host nonexistent.invalid does not resolve, or not only to public addresses",
    )
    assert receiver.requests == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/hook",
        "http://[fd00::1]/hook",
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",
    ],
)
async def test_private_addresses_are_refused_without_naming_them(deliverer: Deliverer, url: str) -> None:
    delivery, elapsed = await _timed(deliverer, url)
    assert delivery.outcome == "blocked_address" and elapsed < 0.5
    host = url.split("/")[2].strip("[]")
    assert host not in delivery.message and host in delivery.detail


def _answers(*addresses: str) -> list[tuple[Any, ...]]:
    return [
        (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, 80))
        for a in addresses
    ]


@dataclass
class FakeDns:
    """Answers for `hooks.example` in place of the system's resolver; counts the questions."""

    answer: list[tuple[Any, ...]] | Exception
    asked: int = 0

    async def getaddrinfo(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        assert host == "hooks.example"
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answer: list[tuple[Any, ...]] | Exception) -> FakeDns:
    dns = FakeDns(answer)
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", dns.getaddrinfo)
    return dns


@pytest.mark.parametrize(
    "answer",
    [
        _answers("127.0.0.1"),
        _answers("93.184.216.34", "10.0.0.5"),
        _answers("::1"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        [],
    ],
    ids=["loopback", "public-and-private", "loopback-v6", "nxdomain", "resolver-busy", "empty"],
)
async def test_a_name_that_resolves_to_a_refused_address_is_refused_before_any_connection(
    open_deliverer: OpenDeliverer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    dns = _fake_dns(monkeypatch, answer)
    deliverer = await open_deliverer(allow=())
    delivery, _ = await _timed(deliverer, receiver.url("/hook", host="hooks.example"))
    assert (delivery.outcome, delivery.message) == (
        "blocked_address",
        "the host hooks.example does not resolve, or not only to public addresses",
    )
    assert receiver.requests == 0 and dns.asked == 1  # asked once: no retry within the attempt


async def test_the_connection_goes_to_the_address_checked(
    deliverer: Deliverer, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name resolves to an allow-listed address once; aiohttp then connects to that very address
    # and never asks DNS itself (it could not resolve `hooks.example`, nor be rebound elsewhere).
    dns = _fake_dns(monkeypatch, _answers("127.0.0.1"))
    delivery, _ = await _timed(deliverer, receiver.url("/status/202", host="hooks.example"))
    assert (delivery.outcome, dns.asked) == ("delivered", 1)
    assert receiver.received[0].headers["Host"] == f"hooks.example:{receiver.port}"


async def test_an_allow_list_entry_admits_only_itself(
    open_deliverer: OpenDeliverer, receiver: Receiver
) -> None:
    deliverer = await open_deliverer(allow=parse_allow_list(["127.0.0.2"]))
    delivery, _ = await _timed(deliverer, receiver.url("/hook"))
    assert delivery.outcome == "blocked_address" and receiver.requests == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "only http and https URLs are fetched"),
        ("", "the URL is empty"),
        ("not a url", "the URL contains spaces, control characters or backslashes"),
        ("http://user:s3cret@example.com/hook", "URLs with credentials are not fetched"),
        ("http://256.1.1.1/hook", "the host looks like an IPv4 address but is not a valid one"),
        ("/relative/hook", "only http and https URLs are fetched"),
        ("http:///hook", "the URL has no host"),
    ],
)
async def test_an_invalid_url_is_refused_without_echoing_it(
    deliverer: Deliverer, url: str, message: str
) -> None:
    delivery, _ = await _timed(deliverer, url)
    assert (delivery.outcome, delivery.status, delivery.message) == ("invalid_url", 0, message)


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"Content-Length": "3"}, "headers['Content-Length']"),
        ({"host": "elsewhere.example"}, "headers['host']"),
        ({"Transfer-Encoding": "chunked"}, "headers['Transfer-Encoding']"),
        ({"bad name": "x"}, "headers['bad name']"),
        ({"webhook-signature": "v1,abc\r\nX-Injected: 1"}, "headers['webhook-signature']"),
        ({"Webhook-Id": "a", "webhook-id": "b"}, "headers['webhook-id']"),
        ({f"x-{i}": "v" for i in range(65)}, "headers"),
    ],
)
async def test_headers_that_cannot_be_sent_are_a_malformed_request(
    deliverer: Deliverer, receiver: Receiver, headers: dict[str, str], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await deliverer.deliver(DeliveryOrder(receiver.url("/"), headers, b""))
    assert [e.field for e in caught.value.errors] == [field]
    assert "abc" not in str(caught.value)  # a value is never quoted: values hold signatures
    assert receiver.requests == 0


async def test_the_log_line_names_the_host_only(
    deliverer: Deliverer, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.imagefetch")
    secrets = ("hook-path-secret", "query-secret", "signature-secret", "body-secret")
    for path in ("/status/204", "/status/500"):
        await _timed(
            deliverer,
            receiver.url(f"{path}/hook-path-secret?token=query-secret"),
            b'{"body-secret": 1}',
            headers={"webhook-signature": "v1,signature-secret"},
        )
    records = [r for r in caplog.records if r.name == "services.imagefetch.delivery"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "webhook delivered"),
        ("WARNING", "webhook not delivered"),
    ]
    for record, (outcome, status) in zip(records, [("delivered", 204), ("http_500", 500)], strict=True):
        fields = vars(record)
        assert (fields["host"], fields["outcome"], fields["status"]) == ("127.0.0.1", outcome, status)
        assert fields["latency_ms"] > 0
        assert not any(secret in repr(fields) for secret in secrets)


# The RPC.


@pytest.fixture
def recorded() -> Recorded:
    return Recorded.create()


@pytest.fixture
async def stub(recorded: Recorded) -> AsyncIterator[Stub]:
    async with (
        running(TEST_SETTINGS, recorded.instruments) as port,
        create_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield imagefetch_pb2_grpc.ImageFetchServiceStub(channel)


async def test_deliver_answers_with_the_outcome(stub: Stub, receiver: Receiver) -> None:
    request = imagefetch_pb2.DeliverRequest(
        url=receiver.url("/status/429?retry_after=3&text=slow+down"),
        headers={"Content-Type": "application/json", "webhook-id": "msg_1"},
        body=b'{"a":1}',
        timeout_s=2.0,
    )
    result = await stub.Deliver(request)
    assert (result.outcome, result.status, result.retry_after_s) == ("http_429", 429, 3.0)
    assert (result.response_excerpt, result.message) == ("slow down", "the receiver answered HTTP 429")
    assert result.latency_ms > 0
    [got] = receiver.received
    assert (got.body, got.headers["webhook-id"]) == (b'{"a":1}', "msg_1")


async def test_a_blocked_delivery_tells_the_caller_nothing_of_the_address(
    recorded: Recorded, receiver: Receiver
) -> None:
    async with (
        running(replace(TEST_SETTINGS, allow=()), recorded.instruments) as port,
        create_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub: Stub = imagefetch_pb2_grpc.ImageFetchServiceStub(channel)
        result = await stub.Deliver(imagefetch_pb2.DeliverRequest(url=receiver.url("/hook", host="0x7f.1")))
    assert (result.outcome, result.status) == ("blocked_address", 0)
    assert result.message == "the URL's host is a loopback address, which is not allowed"
    assert "127.0.0.1" not in str(result) and receiver.requests == 0


async def test_the_callers_grpc_deadline_wins_when_shorter(stub: Stub, receiver: Receiver) -> None:
    started = time.monotonic()
    request = imagefetch_pb2.DeliverRequest(url=receiver.url("/hang"), timeout_s=10.0)
    result = await stub.Deliver(request, timeout=0.5)
    assert time.monotonic() - started < 0.5
    assert (result.outcome, result.status) == ("timeout", 0)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (imagefetch_pb2.DeliverRequest(url="http://x/", timeout_s=-1), "timeout_s"),
        (imagefetch_pb2.DeliverRequest(url="http://x/", timeout_s=float("nan")), "timeout_s"),
        (
            imagefetch_pb2.DeliverRequest(url="http://x/", headers={"Content-Length": "1"}),
            "headers['Content-Length']",
        ),
    ],
)
async def test_malformed_requests_are_invalid_argument(
    stub: Stub, request_: imagefetch_pb2.DeliverRequest, field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught, rpc_errors():
        await stub.Deliver(request_)
    assert [e.field for e in caught.value.errors] == [field]


async def test_each_attempt_leaves_a_client_span_and_metrics(
    stub: Stub, receiver: Receiver, recorded: Recorded
) -> None:
    for path in ("/status/204/secret-path?token=secret-query", "/status/500", "/hang"):
        request = imagefetch_pb2.DeliverRequest(url=receiver.url(path), timeout_s=0.2)
        await stub.Deliver(request)
    await stub.Deliver(imagefetch_pb2.DeliverRequest(url="http://10.0.0.1/hook"))

    spans = [s for s in recorded.spans.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.name for s in spans] == ["POST"] * 4
    attributes = [dict(s.attributes or {}) for s in spans]
    assert [(a["webhook.outcome"], a.get("http.response.status_code")) for a in attributes] == [
        ("delivered", 204),
        ("http_500", 500),
        ("timeout", None),
        ("blocked_address", None),
    ]
    assert attributes[0]["server.address"] == "127.0.0.1"
    assert attributes[0]["server.port"] == receiver.port
    assert not any("secret" in str(a) for a in attributes)
    assert "10.0.0.1" in str(attributes[3]["imagefetch.failure_detail"])  # for operators
    assert [s.status.is_ok for s in spans] == [True, False, False, False]

    assert recorded.points("renderflow.imagefetch.deliveries") == 4
    for outcome in ("delivered", "http_500", "timeout", "blocked_address"):
        assert recorded.points("renderflow.imagefetch.deliveries", outcome=outcome) == 1
        assert recorded.points("renderflow.imagefetch.delivery.duration", outcome=outcome) == 1
