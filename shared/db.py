"""PostgreSQL access shared by the services: an async connection pool and schema migrations.

Each service owns one schema and a folder of numbered `.sql` migrations; `migrate` applies the
ones not yet applied, in order, each in its own transaction, under an advisory lock so that
several processes starting at once apply each migration exactly once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import orjson
import psycopg
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from psycopg import sql
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from shared.resource_metrics import MeasuredPool
from shared.statements import TracedCursor

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


async def open_pool(
    url: str,
    *,
    name: str,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 3.0,
    open_timeout: float = 30.0,
    reconnect_timeout: float = 5.0,
    autocommit: bool = False,
) -> AsyncConnectionPool:
    """An opened pool whose idle connections are checked before use, so a restarted server heals.

    While the database is down a request waits at most `timeout` for a connection, then fails
    (psycopg_pool.PoolTimeout, an OperationalError: the storage edges make it `Unavailable`), so
    clients get a prompt 503 rather than a gateway deadline. psycopg_pool retries a lost connection
    with a delay that doubles without bound; giving up after `reconnect_timeout` lets the next
    request start a fresh attempt, so recovery after the database returns does not grow with the
    length of the outage.

    With `autocommit`, each statement commits on its own (one round trip instead of three);
    operations of several statements open `conn.transaction()` themselves.
    """
    pool = MeasuredPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        timeout=timeout,
        reconnect_timeout=reconnect_timeout,
        check=_check_if_idle,
        reset=_note_returned,
        configure=_fast_json,
        kwargs={**connection_kwargs(name), "autocommit": autocommit},
    )
    await pool.open(wait=True, timeout=open_timeout)
    return pool


def connection_kwargs(name: str) -> dict[str, Any]:
    """How a service's connections are made: named after it (in pg_stat_activity) and with a cursor
    that traces each statement (`shared.statements`)."""
    return {"application_name": f"renderflow-{name}", "cursor_factory": TracedCursor}


async def _fast_json(conn: psycopg.AsyncConnection[Any]) -> None:
    # orjson rather than the standard library's json for json/jsonb values, both ways: a render's
    # submit alone writes six (5 % of generation's CPU under load, measured with py-spy).
    set_json_dumps(orjson.dumps, conn)
    set_json_loads(orjson.loads, conn)


CHECK_IDLE_AFTER_S = 1.0
"""A connection back in the pool for less than this is used without a liveness probe."""
_returned_at: WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = WeakKeyDictionary()


async def _note_returned(conn: psycopg.AsyncConnection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    # A probe is a round trip: under load, on every checkout, it cost as much as the work. A
    # connection that was fine a moment ago is taken as it is (should the server have died in
    # that moment, the statement fails like any other in flight); one idle longer, perhaps
    # across a restart of the server, is probed, so that the pool heals before it is used.
    returned = _returned_at.get(conn)
    if returned is not None and time.monotonic() - returned < CHECK_IDLE_AFTER_S:
        return
    with suppress_instrumentation():  # plumbing, not work: keep it out of the traces
        await AsyncConnectionPool.check_connection(conn)


async def migrate(url: str, schema: str, migrations_dir: Path) -> list[str]:
    """Applies the migrations of `migrations_dir` not yet applied to `schema`; returns their names.
    One trace, `migrate`, holds its statements."""
    with _tracer.start_as_current_span("migrate", attributes={"db.schema": schema}) as span:
        applied = await _migrate(url, schema, migrations_dir)
        span.set_attribute("db.migrations_applied", len(applied))
        return applied


async def _migrate(url: str, schema: str, migrations_dir: Path) -> list[str]:
    applied: list[str] = []
    connect = psycopg.AsyncConnection.connect
    async with await connect(url, autocommit=True, cursor_factory=TracedCursor) as conn:
        await conn.execute("SELECT pg_advisory_lock(hashtext(%s))", [f"migrate:{schema}"])
        try:
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations"
                    " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(schema))
            )
            cur = await conn.execute(
                sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))
            )
            done = {row[0] for row in await cur.fetchall()}
            for path in sorted(migrations_dir.glob("*.sql")):
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("SET LOCAL search_path TO {}, public").format(sql.Identifier(schema))
                    )
                    await conn.execute(path.read_text().encode())
                    await conn.execute(
                        sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(
                            sql.Identifier(schema)
                        ),
                        [path.stem],
                    )
                applied.append(path.stem)
                log.info("applied migration", extra={"schema": schema, "migration": path.stem})
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [f"migrate:{schema}"])
    return applied
