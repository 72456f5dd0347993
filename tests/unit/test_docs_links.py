"""The README and docs/ point only at files a clone has: every relative link, and every path of
the repository written in backticks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TOP = ("docs", "services", "gateway", "shared", "tools", "tests", "k8s", "protos")
PATH = re.compile(rf"`((?:{'|'.join(TOP)})/[\w./-]*[\w/])`")


def _targets(page: Path) -> list[tuple[str, Path]]:
    text = page.read_text()
    found = [(link, (page.parent / link).resolve()) for link in LINK.findall(text) if "://" not in link]
    found += [(path, ROOT / path) for path in PATH.findall(text) if "*" not in path and "<" not in path]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_path_exists(page: Path) -> None:
    missing = [written for written, target in _targets(page) if not target.exists()]
    assert not missing, f"{page.relative_to(ROOT)} points at what a clone does not have: {missing}"


def test_the_readme_leads_to_every_page_of_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md names no link to {unlinked}"
