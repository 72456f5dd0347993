"""SQL by name: each service keeps its statements as named blocks of a `queries.sql`, read once at
import by `load_queries`; every statement a pool's connection runs is a CLIENT span named by its
block (`submit_render`), or by its operation and table for a statement written elsewhere
(`SELECT renders`), and carries both as `db.operation.name` and `db.collection.name` (the main
statement's, also past a WITH's common table expressions).

The spans come from the connections' cursor class (`TracedCursor`, which `shared.db.open_pool`
gives every connection), not from OpenTelemetry's psycopg instrumentation: that one cost ~0.35 ms of
CPU per statement on the submit path (it parses the statement for its verb and ships its whole text,
kilobytes for a submit, with every span); a span named after a block of `queries.sql` says the same
in a few bytes. `suppress_instrumentation()` keeps a statement out of the traces, as it did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psycopg
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind, Status, StatusCode

SCOPE = "renderflow.sql"
"""The instrumentation scope of the statements' spans."""
_tracer = trace.get_tracer(SCOPE)
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_names: dict[str, str] = {}
"""Each loaded statement's text -> its name."""
_described: dict[str, Mapping[str, str]] = {}
"""Each loaded statement's text -> its span's attributes (worked out once, at load)."""


def parse_queries(text: str) -> dict[str, str]:
    """{name: statement} of every block of `text`. A block starts at a `-- name: <name>` line; the
    comment lines around its statement describe it (or open the next section) and are not sent."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, block in zip(parts[1::2], parts[2::2], strict=True):
        lines = block.strip().splitlines()
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("--")):
            lines.pop()
        if name in queries or not lines:
            raise ValueError(f"query {name!r} is defined twice or is empty")
        queries[name] = "\n".join(lines)
    return queries


def load_queries(path: Path) -> Mapping[str, str]:
    """The statements of the `queries.sql` at `path`, by name; their spans will bear these names."""
    queries = parse_queries(path.read_text())
    name_statements(queries.items())
    return MappingProxyType(queries)


def name_statements(named: Iterable[tuple[str, str]]) -> None:
    """Gives statements built elsewhere (a block with its `{part}` filled in) a span name."""
    for name, text in named:
        _names[text] = name
        _described[text] = _attributes_of(text)


def describe(text: str) -> tuple[str, str | None]:
    """The operation of a statement's main part and the table it works on, as far as a glance at
    its words tells: `("INSERT", "renders")`; past comments, string literals and a WITH's
    common table expressions (in parentheses) to the statement they feed."""
    words: list[tuple[int, str]] = []
    depth = 0
    for token in _TOKEN.findall(_COMMENT.sub(" ", text)):
        if token == "(":
            if depth == 0:
                words.append((0, "("))  # a subquery where a table could be: no table to name
            depth += 1
        elif token == ")":
            depth = max(0, depth - 1)
        elif token[0] not in "'\"":
            words.append((depth, token.upper()))
    top = [word for level, word in words if level == 0]
    if not top:
        return "SQL", None
    operation = top[0]
    if operation == "WITH":
        operation = next((w for w in top[1:] if w in _MAIN), "WITH")
    start = top.index(operation) if operation in top else 0
    after = _TABLE_AFTER.get(operation)
    table = None
    if after is not None:
        rest = top[start + 1 :]
        marks = [index for index, word in enumerate(rest) if word in after] if after else [-1]
        if marks:
            following = [w for w in rest[marks[0] + 1 :] if w not in _SKIPPED]
            table = following[0].lower() if following and following[0] != "(" else None
    return operation, table


_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|[A-Za-z_][\w.$]*|[()]")
_MAIN = ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE")
_TABLE_AFTER: dict[str, tuple[str, ...]] = {
    "SELECT": ("FROM",),
    "INSERT": ("INTO",),
    "UPDATE": (),
    "DELETE": ("FROM",),
    "MERGE": ("INTO",),
    "CREATE": ("TABLE", "INDEX", "VIEW", "SCHEMA"),
    "ALTER": ("TABLE", "INDEX"),
    "DROP": ("TABLE", "INDEX", "VIEW", "SCHEMA"),
}
"""The word a statement's table follows (none: it follows the operation itself)."""
_SKIPPED = frozenset({"IF", "NOT", "EXISTS", "ONLY", "CONCURRENTLY", "UNIQUE"})


def _attributes_of(text: str) -> Mapping[str, str]:
    operation, table = describe(text)
    described = {**_ATTRIBUTES, "db.operation.name": operation}
    if table:
        described["db.collection.name"] = table
    return MappingProxyType(described)


def statement_name(query: Any) -> str:
    """The name a statement's span bears: its block's, else its operation and table
    (`SELECT renders`)."""
    return _described_span(query)[0]


def _described_span(query: Any) -> tuple[str, Mapping[str, str]]:
    """A statement's span name and attributes."""
    if isinstance(query, str):
        name = _names.get(query)
        if name is not None:
            return name, _described[query]
        text = query
    elif isinstance(query, bytes):
        text = query.decode(errors="replace")
    else:  # psycopg.sql.Composed and friends: migrations and administration
        return "SQL", _ATTRIBUTES
    return _unnamed(text)


@lru_cache(maxsize=512)
def _unnamed(text: str) -> tuple[str, Mapping[str, str]]:
    attributes = _attributes_of(text)
    table = attributes.get("db.collection.name")
    operation = attributes["db.operation.name"]
    return (f"{operation} {table}" if table else operation), attributes


class TracedCursor(psycopg.AsyncCursor[Any]):
    """A cursor whose every statement is a CLIENT span of the current trace."""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> TracedCursor:
        with _statement_span(query):
            await super().execute(query, params, **kwargs)
        return self

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        with _statement_span(query):
            await super().executemany(query, params_seq, returning=returning)


@contextmanager
def _statement_span(query: Any) -> Iterator[None]:
    if not is_instrumentation_enabled():
        yield
        return
    name, attributes = _described_span(query)
    span = _tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    try:
        yield
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()


_ATTRIBUTES = {"db.system": "postgresql", "db.system.name": "postgresql"}
"""The database, by the older and the current conventions' names."""
