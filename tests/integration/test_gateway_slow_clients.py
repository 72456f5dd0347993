"""Slow clients cannot take the gateway down: a request head must arrive within the header deadline
and a body within the body deadline; connections are capped per client address and in all, and
closed at once past a cap; and if descriptors run out anyway, the accept loop's error is logged
rarely instead of thousands of times a second. The slow tests attack a gateway process whose
open-file limit is 1024 (or less)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import resource
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from yarl import URL

from gateway.app import running
from gateway.config import Settings
from shared.service_auth import new_service_token
from shared.settings import Addresses, Env
from tests.conftest import free_port
from tests.support import TOKEN_ENV
from tests.support.gateway_stack import PROBLEM, LiveStack, eventually

REPO = Path(__file__).resolve().parents[2]
ACCEPT_ERROR = "socket.accept() out of system resource"
GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


@pytest.fixture
def gateway_settings() -> Settings:
    """The gateway of `stack` (used here for a route that reads a body): a short body deadline."""
    return Settings(body_timeout_s=0.5, shutdown_grace_s=0.5)


@asynccontextmanager
async def gateway(**changes: Any) -> AsyncIterator[int]:
    """A gateway alone in this process, on port 0 (/healthz needs no service behind it)."""
    unused = Addresses(metadata=f"127.0.0.1:{free_port()}", generation=f"127.0.0.1:{free_port()}")
    settings = Settings(port=0, addresses=unused, shutdown_grace_s=0.5, **changes)
    async with running(settings, tracer_provider=TracerProvider()) as port:
        yield port


async def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A plain TCP connection from `source` (any 127/8 address reaches the loopback)."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def received_until_closed(sock: socket.socket, within_s: float) -> bytes | None:
    """Whatever the server sends until it closes the connection (end of stream or reset); None when
    it is still open after `within_s`."""
    loop = asyncio.get_running_loop()
    received = b""
    try:
        async with asyncio.timeout(within_s):
            while chunk := await loop.sock_recv(sock, 65536):
                received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


async def exchange(sock: socket.socket) -> int:
    """GET /healthz on a kept-alive connection: the response's status, once all of it has arrived."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, GET_HEALTHZ)
    received = b""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in received:
            received += await loop.sock_recv(sock, 65536)
        head, body = received.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length is not None, head
        while len(body) < int(length[1]):
            body += await loop.sock_recv(sock, 65536)
    return int(head.split()[1])


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, body = raw.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


async def healthz_from(port: int, source: str, timeout_s: float = 5.0) -> int | None:
    """GET /healthz on a new connection from `source`: the status, or None when it fails."""
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        try:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return None


@contextlib.contextmanager
def closing_all(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def test_a_request_head_trickled_past_the_header_deadline_is_closed() -> None:
    async with gateway(header_timeout_s=0.5) as port:
        sock = await connect(port)
        opened = time.monotonic()
        sock.send(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")

        async def trickle() -> None:  # a header line every 0.1 s: data keeps coming, the head never ends
            for n in itertools.count():
                await asyncio.sleep(0.1)
                with contextlib.suppress(OSError):
                    sock.send(b"X-Slow-%d: 1\r\n" % n)

        trickler = asyncio.create_task(trickle())
        with closing_all([sock]):
            try:
                received = await received_until_closed(sock, within_s=5)
            finally:
                trickler.cancel()
        assert received == b"", "the connection must be closed, without an answer"
        assert 0.4 < time.monotonic() - opened < 2


async def test_a_kept_alive_connection_idle_past_the_header_deadline_is_closed() -> None:
    async with gateway(header_timeout_s=0.5) as port:
        with closing_all([await connect(port)]) as (sock,):
            assert await exchange(sock) == 200
            answered = time.monotonic()
            assert await exchange(sock) == 200, "kept alive: a second request is served"
            assert await received_until_closed(sock, within_s=5) == b""
            assert 0.4 < time.monotonic() - answered < 2


async def test_a_body_trickled_past_the_body_deadline_is_answered_408(stack: LiveStack) -> None:
    key = (await stack.user("slowpoke"))["Authorization"]
    port = URL(stack.base).port
    assert port is not None
    body = b'{"slug": "slow", "name": "Slow"}' + b" " * 30
    sock = await connect(port)
    sock.send(
        b"POST /v1/projects HTTP/1.1\r\nHost: gateway\r\nAuthorization: %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body))
    )
    sent = time.monotonic()

    async def trickle() -> None:  # a byte every 0.1 s: 6 s for the whole body
        for byte in body:
            await asyncio.sleep(0.1)
            with contextlib.suppress(OSError):
                sock.send(bytes([byte]))

    trickler = asyncio.create_task(trickle())
    with closing_all([sock]):
        try:
            received = await received_until_closed(sock, within_s=4)
        finally:
            trickler.cancel()
    assert received, "answered, and the connection closed"
    status, headers, payload = parse_response(received)
    assert status == 408 and headers["content-type"].startswith(PROBLEM)
    assert headers["connection"] == "close"
    problem = json.loads(payload)
    assert problem["code"] == "request_timeout" and problem["status"] == 408
    assert 0.4 < time.monotonic() - sent < 3
    response, _ = await stack.call("GET", "/v1/projects/slow", {"Authorization": key})
    assert response.status == 404, "the late request did nothing"


async def test_connections_past_a_clients_cap_are_closed_at_once_while_others_are_served() -> None:
    async with gateway(max_connections_per_client=3) as port:
        with closing_all([await connect(port) for _ in range(3)]) as held:
            for sock in held:
                assert await exchange(sock) == 200  # open, admitted and kept alive
            with closing_all([await connect(port)]) as (extra,):
                assert await received_until_closed(extra, within_s=1) == b"", "closed at once, unread"
            assert await healthz_from(port, "127.0.0.2") == 200
            held.pop().close()

            async def freed() -> bool:  # the slot frees once the gateway sees the close
                return await healthz_from(port, "127.0.0.1") == 200

            await eventually(freed)


async def test_connections_past_the_total_cap_are_closed_at_once() -> None:
    async with gateway(max_connections=3, max_connections_per_client=100) as port:
        with closing_all([await connect(port) for _ in range(3)]) as held:
            for sock in held:
                assert await exchange(sock) == 200
            with closing_all([await connect(port, source="127.0.0.2")]) as (extra,):
                assert await received_until_closed(extra, within_s=1) == b""


def test_the_total_cap_defaults_to_the_open_file_limit_less_a_reserve() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    derived = Settings.from_env(Env(TOKEN_ENV)).max_connections
    assert soft // 2 < derived <= soft - max(64, soft // 10)
    assert (
        Settings.from_env(Env({**TOKEN_ENV, "RENDERFLOW_GATEWAY_MAX_CONNECTIONS": "5"})).max_connections == 5
    )


# The attack, at reduced scale, on a gateway process of its own.


@contextlib.contextmanager
def open_files_raised_to(wanted: int) -> Iterator[None]:
    """This process's soft open-file limit raised (within the hard limit) for the attacker's sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


_GATEWAY_WITH_OPEN_FILES = """
import resource, runpy, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
runpy.run_module("gateway", run_name="__main__", alter_sys=True)
"""
"""`python -m gateway` with its open-file limit lowered to argv[1], by the child itself once it runs:
not in a `preexec_fn`, which runs between fork and exec and can deadlock there on a lock another
thread of this process held at the fork (gRPC's threads, which the suite has running)."""


@asynccontextmanager
async def gateway_process(tmp_path: Path, open_files: int, **env: str) -> AsyncIterator[tuple[int, Path]]:
    """`python -m gateway` with its open-file limit lowered to `open_files` and no service behind it;
    yields its port and the file its log (stderr) goes to, complete once the block has exited.

    It listens on a port of its choosing (which its log says): a port picked here and released
    for it to take may meanwhile be taken by another test's server."""
    environ = {
        **os.environ,
        "RENDERFLOW_GATEWAY_PORT": "0",
        "RENDERFLOW_RUN_DIR": str(tmp_path / "run"),
        "RENDERFLOW_METADATA_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
        **env,
    }
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:  # a file, not a pipe: a flood must not block the process
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _GATEWAY_WITH_OPEN_FILES, str(open_files), cwd=REPO, env=environ, stderr=log
        )
    try:
        port = 0

        async def listening() -> bool:
            nonlocal port
            if process.returncode is not None:
                raise AssertionError(f"the gateway exited ({process.returncode}):\n{log_path.read_text()}")
            for line in log_path.read_text().splitlines():
                if '"gateway listening"' in line:
                    port = URL(json.loads(line)["url"]).port or 0
            return bool(port) and await healthz_from(port, "127.0.0.1", timeout_s=1) == 200

        await eventually(listening, timeout_s=20)
        yield port, log_path
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


class SlowSockets:
    """The attacker: connections from one source address, each sending a request head one header
    line at a time and never finishing it. A connection the gateway closes is not opened again."""

    def __init__(self, port: int, source: str) -> None:
        self.port, self.source = port, source
        self.sockets: list[socket.socket] = []
        self.connected: list[socket.socket] = []

    async def open(self, count: int, within_s: float) -> None:
        """Opens up to `count` connections, as fast as the gateway accepts them, for at most
        `within_s` (connections a gateway that stopped accepting never completes are given up)."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(200)

        async def one() -> None:
            sock = socket.socket()
            self.sockets.append(sock)  # closed with the others, whatever happens to the connect
            sock.setblocking(False)
            sock.bind((self.source, 0))
            async with gate:
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
            self.connected.append(sock)
            with contextlib.suppress(OSError):
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        _, pending = await asyncio.wait(tasks, timeout=within_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def trickle(self, every_s: float) -> None:
        """A header line on every connection still open, every `every_s`."""
        closed: set[socket.socket] = set()
        for n in itertools.count():
            for sock in self.connected:
                if sock not in closed:
                    try:
                        sock.send(b"X-Slow-%d: 1\r\n" % n)
                    except OSError:
                        closed.add(sock)
            await asyncio.sleep(every_s)

    def still_open(self) -> int:
        """Connections the gateway has not closed."""
        count = 0
        for sock in self.connected:
            try:
                count += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                count += 1
            except OSError:
                pass
        return count

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.mark.slow
async def test_a_flood_of_slow_connections_does_not_starve_other_clients(tmp_path: Path) -> None:
    with open_files_raised_to(8192):
        async with gateway_process(tmp_path, open_files=1024) as (port, log_path):
            attacker = SlowSockets(port, "127.0.0.2")
            trickler = asyncio.create_task(attacker.trickle(every_s=1.0))
            try:
                await attacker.open(3000, within_s=5)
                latencies: list[float] = []
                failures = 0
                while len(latencies) < 300 and failures < 3:  # GET /healthz, a new connection each
                    started = time.perf_counter()
                    if await healthz_from(port, "127.0.0.1", timeout_s=1) == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1
                held = attacker.still_open()
            finally:
                trickler.cancel()
                attacker.close()
    log = log_path.read_text().splitlines()
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else float("inf")
    print(
        f"\nattacker: {len(attacker.connected)} of 3000 connected, {held} still open; client: "
        f"{len(latencies)} answered, {failures} failed, p99 {p99 * 1000:.1f} ms; log: {len(log)} lines"
    )
    assert failures == 0 and len(latencies) == 300
    assert p99 < 0.1
    assert held <= Settings().max_connections_per_client
    assert sum(ACCEPT_ERROR in line for line in log) <= 2
    assert len(log) < 50, log[-5:]


@pytest.mark.slow
async def test_descriptors_run_out_the_accept_error_is_logged_rarely_and_the_gateway_recovers(
    tmp_path: Path,
) -> None:
    uncapped = {
        "RENDERFLOW_GATEWAY_MAX_CONNECTIONS": "100000",
        "RENDERFLOW_GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "100000",
        # Long enough that the attacker's connections pile up past the descriptors however slowly a
        # busy machine lets the gateway accept them (at 1 s, a gateway accepting fewer than ~230 a
        # second closed the first before the last came, and never ran out); short enough to recover.
        "RENDERFLOW_GATEWAY_HEADER_TIMEOUT_S": "5",
    }
    with open_files_raised_to(4096):
        async with gateway_process(tmp_path, open_files=256, **uncapped) as (port, log_path):
            attacker = SlowSockets(port, "127.0.0.2")
            try:
                await attacker.open(400, within_s=2)

                async def served() -> bool:  # once the header deadline has closed the attacker's
                    return await healthz_from(port, "127.0.0.1", timeout_s=2) == 200

                await eventually(served, timeout_s=15)
            finally:
                attacker.close()
    errors = [json.loads(line) for line in log_path.read_text().splitlines() if ACCEPT_ERROR in line]
    assert 1 <= len(errors) <= 3, f"{len(errors)} accept errors logged"
    assert sum(entry.get("suppressed", 0) for entry in errors) > 0, "repeats are counted, not logged"
