"""`python -m tools.settings_reference [--check]`: docs/settings.md, made from the code.

A setting is defined where it is read: the code reads `env.int("RENDERFLOW_X", 4)` and documents
it in a docstring that begins `RENDERFLOW_X: what it does` (a settings field's, a constant's or a
function's). This collects both from every module of the services, the gateway, shared/ and tools/
and writes the reference; `--check` exits 1 when the file is not what the code says, or when a
variable is read that no docstring defines.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import RENAMED

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("gateway", "services", "shared", "tools")
REFERENCE = ROOT / "docs" / "settings.md"
_NAME = r"(?:RENDERFLOW_[A-Z0-9_<>]+|OTEL_[A-Z0-9_]+|DATABASE_URL)"
NAME = re.compile(rf"^{_NAME}$")
DEFINITION = re.compile(rf"^`?({_NAME})`?((?:,\s*`?{_NAME}`?)*)\s*(?:\([^)]*\))?:\s+(.+)", re.DOTALL)
READERS = {"str", "int", "float", "bool", "optional", "list"}
AREAS = {
    "GATEWAY": "The gateway (HTTP API)",
    "METADATA": "The metadata service",
    "IMAGEFETCH": "The image-fetch service",
    "GENERATION": "The generation service",
    "WORKER": "The workers",
    "BACKEND": "Generator backends (read by the workers)",
    "LOCAL": "The local stack (`renderflow run`)",
    "WEBHOOKS": "Webhooks (sent by the generation service)",
}
OTHER = "Shared by several processes"


@dataclass
class Setting:
    name: str
    meaning: str = ""
    defaults: set[str] = field(default_factory=set)
    read_by: set[str] = field(default_factory=set)

    @property
    def area(self) -> str:
        word = self.name.removeprefix("RENDERFLOW_").split("_")[0]
        return word if self.name.startswith("RENDERFLOW_") and word in AREAS else OTHER


def _component(path: Path) -> str:
    parts = path.parts
    if parts[0] in ("services", "tools") and len(parts) > 2:
        return parts[1]
    return "every process" if parts[0] == "shared" else parts[0]


def _default(call: ast.Call, known: dict[str, ast.expr]) -> str | None:
    """The default the call reads its variable with, as written, a field's or a constant's default
    (`cls.port`, `TRACES_MAX_BYTES`) looked up in the module."""
    if len(call.args) < 2:
        return None
    node = call.args[1]
    if isinstance(node, ast.Attribute | ast.Name):
        node = known.get(node.attr if isinstance(node, ast.Attribute) else node.id, node)
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)
    return "(empty)" if value == "" else repr(value) if isinstance(value, str) else str(value)


def _known_values(tree: ast.Module) -> dict[str, ast.expr]:
    """The module's constants and its classes' field defaults, by name."""
    known: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            known.setdefault(node.target.id, node.value)
        elif (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            known.setdefault(node.targets[0].id, node.value)
    return known


def collect(root: Path = ROOT) -> tuple[dict[str, Setting], list[str]]:
    """The settings defined and read in the code under `root`, and the names read that none defines."""
    settings: dict[str, Setting] = {}
    read: dict[str, set[str]] = defaultdict(set)
    trees = {
        path: ast.parse(path.read_text(), str(path))
        for top in SOURCES
        for path in sorted((root / top).rglob("*.py"))
        if path != Path(__file__).resolve()
    }
    everywhere: dict[str, ast.expr] = {}
    for tree in trees.values():
        for name, value in _known_values(tree).items():
            everywhere.setdefault(name, value)
    for path, tree in trees.items():
        known = {**everywhere, **_known_values(tree)}
        _scan(tree, _component(path.relative_to(root)), known, settings, read)
    undefined: list[str] = []
    for name, components in sorted(read.items()):
        match = settings.get(name) or next(
            (s for s in settings.values() if "<" in s.name and _as_pattern(s.name).fullmatch(name)), None
        )
        if match is None or not match.meaning:
            undefined.append(name)
        else:
            match.read_by |= components
    return {n: s for n, s in settings.items() if s.meaning}, undefined


def _scan(
    tree: ast.Module,
    component: str,
    known: dict[str, ast.expr],
    settings: dict[str, Setting],
    read: dict[str, set[str]],
) -> None:
    """Adds the module's definitions (docstrings) and defaults to `settings`, its reads to `read`."""
    skipped = {id(n) for n in _not_reads(tree)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if NAME.match(text) and text not in RENAMED:
                read[text].add(component)
            elif found := DEFINITION.match(text):
                meaning = " ".join(found[3].split())
                for name in [found[1], *re.findall(_NAME, found[2])]:
                    setting = settings.setdefault(name, Setting(name))
                    setting.meaning = setting.meaning or meaning
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and str(first.value).startswith("RENDERFLOW_"):
                pattern = "".join(
                    str(part.value) if isinstance(part, ast.Constant) else "<X>" for part in node.values
                )
                if " " not in pattern:  # a message that names a variable is not a read
                    read[pattern].add(component)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in READERS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and NAME.match(node.args[0].value)
        ):
            default = _default(node, known)
            if default is not None:
                settings.setdefault(node.args[0].value, Setting(node.args[0].value)).defaults.add(default)


def _not_reads(tree: ast.Module) -> list[ast.AST]:
    """Names that are not read where they stand: the parts of an f-string (the whole is read), and
    the map of renamed settings."""
    skipped: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skipped += node.values
        elif isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "RENAMED" for t in targets) and node.value is not None:
                skipped += list(ast.walk(node.value))
    return skipped


def _as_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"<[A-Z]+>", "<X>", re.escape(name).replace(r"\<", "<").replace(r"\>", ">")))


def reference(settings: dict[str, Setting]) -> str:
    """docs/settings.md."""
    lines = [
        "# Settings",
        "",
        "Every process is configured by environment variables; each has a default that works on one",
        "machine. A setting is named `RENDERFLOW_<AREA>_<NAME>`, the area being the process that reads",
        "it, or what several processes share (`CACHE`, `LOG`, `METRICS`, `TRACES`, ...); the standard",
        "`DATABASE_URL` and `OTEL_*` variables keep their names. An empty value is the same as unset.",
        "",
        "This page is made from the code (`python -m tools.settings_reference`), where each setting is",
        "read and documented; a test fails when they part.",
        "",
    ]
    by_area: dict[str, list[Setting]] = defaultdict(list)
    for setting in settings.values():
        by_area[setting.area].append(setting)
    for area in [*AREAS, OTHER]:
        if not by_area.get(area):
            continue
        lines += [
            f"## {AREAS.get(area, area)}",
            "",
            "| variable | default | read in | what it does |",
            "| --- | --- | --- | --- |",
        ]
        for setting in sorted(by_area[area], key=lambda s: s.name):
            default = ", ".join(f"`{d}`" for d in sorted(setting.defaults)) or "see the text"
            read_by = ", ".join(sorted(setting.read_by)) or "—"
            meaning = setting.meaning.replace("|", r"\|")
            lines.append(f"| `{setting.name}` | {default} | {read_by} | {meaning} |")
        lines.append("")
    lines += [
        "## Renamed",
        "",
        "The old names are still read, with a warning, when the new one is not set; they go in the next",
        "release.",
        "",
        "| old name | new name |",
        "| --- | --- |",
        *(f"| `{old}` | {', '.join(f'`{n}`' for n in new)} |" for old, new in sorted(RENAMED.items())),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.settings_reference", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/settings.md is out of date")
    args = parser.parse_args(argv)
    settings, undefined = collect()
    if undefined:
        print(
            "read but defined by no docstring (`NAME: what it does`):", ", ".join(undefined), file=sys.stderr
        )
        return 1
    text = reference(settings)
    if args.check:
        if REFERENCE.read_text() != text:
            print(
                f"{REFERENCE.relative_to(ROOT)} is out of date: run python -m tools.settings_reference",
                file=sys.stderr,
            )
            return 1
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE.relative_to(ROOT)}: {len(settings)} settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
