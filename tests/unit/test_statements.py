"""The spans of SQL statements say what each does and to which table, named blocks and statements
written elsewhere alike; past comments, string literals and a WITH's common table expressions."""

from __future__ import annotations

import pytest

from shared.statements import describe, name_statements, statement_name

CTE = "WITH a AS (SELECT * FROM jobs), b AS (DELETE FROM locks) UPDATE renders SET x = 1"


@pytest.mark.parametrize(
    ("text", "operation", "table"),
    [
        ("SELECT id FROM renders WHERE user_id = %s", "SELECT", "renders"),
        ("-- the queue\nSELECT 1", "SELECT", None),
        ("/* x */ INSERT INTO generation.events (a) VALUES ('( FROM x')", "INSERT", "generation.events"),
        (CTE, "UPDATE", "renders"),
        ("UPDATE ONLY jobs SET leased_until = now()", "UPDATE", "jobs"),
        ("DELETE FROM uploads WHERE id = ANY(%(ids)s)", "DELETE", "uploads"),
        ("CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads (expires_at)", "CREATE", "uploads_expiry"),
        ("ALTER TABLE renders ADD COLUMN hooked boolean", "ALTER", "renders"),
        ("SELECT count(*) FROM (SELECT 1 FROM jobs) AS q", "SELECT", None),
        ("", "SQL", None),
    ],
)
def test_the_operation_and_table_of_a_statement(text: str, operation: str, table: str | None) -> None:
    assert describe(text) == (operation, table)


def test_span_names_are_the_block_s_else_operation_and_table() -> None:
    named = "SELECT * FROM webhook_endpoints WHERE id = %(id)s AND 1 = 1"
    name_statements([("endpoint_by_id", named)])
    assert statement_name(named) == "endpoint_by_id"
    assert statement_name("select * from renders") == "SELECT renders"
    assert statement_name(b"LISTEN generation_events") == "LISTEN"
