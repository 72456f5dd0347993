"""Fixtures every tier shares: a real PostgreSQL started for the test session, a fresh database
per test, free TCP ports; and the check, after the whole session, that no API key was written to
a log record, a log file or a trace file."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from shared.settings import Env
from tests.support.leaks import KeyLeakWatch, leaks_in_files
from tools.embedded_pg.server import EmbeddedPostgres


@pytest.fixture(scope="session", autouse=True)
def no_key_is_ever_logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Watches every log record of the session at INFO and above (the level processes run at), and
    afterwards reads every log and trace file the session's processes wrote: none may hold a key."""
    watch = KeyLeakWatch()
    root = logging.getLogger()
    level = root.level
    root.addHandler(watch)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(watch)
        root.setLevel(level)
    leaks = watch.leaks + list(leaks_in_files([tmp_path_factory.getbasetemp()]))
    assert not leaks, f"API keys were written where they must never be: {leaks[:10]}"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server for the session: `DATABASE_URL`'s when set, else one started here."""
    external = Env().optional("DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", fast=True)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A new, empty database for one test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(pg_server_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_server_url, dbname=name)
    async with await psycopg.AsyncConnection.connect(pg_server_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
