"""SQL by name: each service keeps its statements as named blocks of a `queries.sql`, read once at
import by `load_queries`; every statement a pool's connection runs is a CLIENT span named by its
block (`submit_render`), or by its verb for a statement written elsewhere (`SELECT`).

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
    _names.update((text, name) for name, text in named)


def statement_name(query: Any) -> str:
    """The name a statement's span bears: its block's, else its first word (`SELECT`)."""
    if isinstance(query, str):
        name = _names.get(query)
        if name is not None:
            return name
        text = query
    elif isinstance(query, bytes):
        text = query.decode(errors="replace")
    else:  # psycopg.sql.Composed and friends: migrations and administration
        return "SQL"
    words = text.split(None, 1)
    return words[0].upper() if words else "SQL"


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
    span = _tracer.start_span(statement_name(query), kind=SpanKind.CLIENT, attributes=_ATTRIBUTES)
    try:
        yield
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()


_ATTRIBUTES = {"db.system": "postgresql", "db.system.name": "postgresql"}
"""The database, by the older and the current conventions' names."""
