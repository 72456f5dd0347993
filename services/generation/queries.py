"""The statements of `queries.sql`, by name, read once at import.

A block starts at a `-- name: <query_name>` line; the comment lines right after it say what it does
and are not sent. A `{part}` in a statement is filled in by its caller (a fence, a filter).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """{name: statement} of every named block of `text`."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, block in zip(parts[1::2], parts[2::2], strict=True):
        lines = block.strip().splitlines()
        # Comments before and after the statement describe it or open the next section.
        while lines and lines[0].startswith("--"):
            lines.pop(0)
        while lines and (not lines[-1].strip() or lines[-1].startswith("--")):
            lines.pop()
        if name in queries or not lines:
            raise ValueError(f"query {name!r} is defined twice or is empty")
        queries[name] = "\n".join(lines)
    return queries


QUERIES: Mapping[str, str] = MappingProxyType(parse((Path(__file__).parent / "queries.sql").read_text()))
