"""The statements of `queries.sql`, by name, read once at import (`shared.statements`: the format,
and the span each statement is traced as). A `{part}` in a statement is filled in by its caller (a
fence, a filter); the statements so made are named where they are made."""

from __future__ import annotations

from pathlib import Path

from shared.statements import load_queries

QUERIES = load_queries(Path(__file__).with_name("queries.sql"))
