"""The import graph keeps the shape docs/architecture.md gives the code: `services/` holds the three services
and nothing else, a service imports neither another service nor the gateway, `shared/` serves the
services and the gateway (no module of it that none of them uses), the tools stay out of
production code, and no module imports itself round a circle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"metadata", "imagefetch", "generation"}
PRODUCTION = ("services", "gateway", "shared")
OURS = (*PRODUCTION, "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for top in OURS
        for path in sorted((ROOT / top).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


MODULES = _modules()


def _imported(name: str, path: Path) -> Iterator[str]:
    """The modules of ours that `name` imports, at any depth of its code (a function's lazy import
    is an import all the same), each resolved to a module that exists."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # `from x import y`: y is a module of x, or a name defined in x.
            while candidate and candidate not in MODULES:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                yield candidate
                break


GRAPH = {name: sorted(set(_imported(name, path))) for name, path in MODULES.items()}


def _area(module: str) -> str:
    """`services.generation.store` → `services.generation`; `gateway.app` → `gateway`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("services", "tools") and len(parts) > 1 else parts[0]


def test_services_holds_the_three_services_and_nothing_else() -> None:
    entries = {p.name for p in (ROOT / "services").iterdir() if p.name != "__pycache__"}
    assert entries == SERVICES | {"__init__.py"}


SHAPE = {"__main__.py", "server.py", "servicer.py", "service.py", "domain.py", "config.py"}
"""What every service has: its entry point, its gRPC server, the servicer (protobuf ⇄ domain), the
service (what it does), its domain values and rules (no I/O), its settings."""
WITH_DATABASE = {"store.py", "queries.sql", "migrations"}
"""And a service with tables: its store (all its SQL, in queries.sql) and its migrations."""


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_has_the_same_shape(service: str) -> None:
    entries = {p.name for p in (ROOT / "services" / service).iterdir()}
    assert entries >= SHAPE, SHAPE - entries
    if "queries.sql" in entries or "migrations" in entries:
        assert entries >= WITH_DATABASE, WITH_DATABASE - entries


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.split(".")[0] in PRODUCTION))
def test_production_code_imports_only_its_own_area_and_shared(module: str) -> None:
    area = _area(module)
    allowed = {area, "shared"}
    foreign = [imported for imported in GRAPH[module] if _area(imported) not in allowed]
    assert not foreign, f"{module} imports {foreign}"


def test_every_shared_module_serves_a_service_or_the_gateway() -> None:
    used: set[str] = set()
    pending = [m for m in GRAPH if m.split(".")[0] in ("services", "gateway")]
    while pending:
        for imported in GRAPH[pending.pop()]:
            if imported not in used:
                used.add(imported)
                pending.append(imported)
    unused = sorted(m for m in GRAPH if m.startswith("shared.") and m not in used)
    assert not unused, f"in shared/ but used by no service nor the gateway: {unused}"


def test_no_import_circles() -> None:
    """Package `__init__` modules aside (a package importing its own parts is how it re-exports)."""
    edges = {
        name: [m for m in imports if MODULES[m].name != "__init__.py"]
        for name, imports in GRAPH.items()
        if MODULES[name].name != "__init__.py"
    }
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for nxt in edges.get(node, []):
            if nxt in on_path:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        on_path.discard(node)
        path.pop()
        done.add(node)

    for name in sorted(edges):
        if name not in done:
            visit(name)
    assert not circles, "\n".join(" → ".join(circle) for circle in circles)
