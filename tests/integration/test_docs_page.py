"""The API page at /docs on a real gateway: public, its assets served with their types and caching,
and, in headless Chromium, every operation of the OpenAPI document rendered (a skip that says why
when no Chromium is installed)."""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from gateway.openapi import SPEC
from gateway.routes.docs import CONTENT_SECURITY_POLICY, IMMUTABLE
from tests.support.gateway_stack import LiveStack, assert_problem

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER_TIMEOUT_S = 60.0
"""Chromium starts, loads the page and renders within a few seconds; past this it is stuck."""
TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}

Operation = tuple[str, str, str, str]
"""Method, path, operationId and summary."""


class _Links(HTMLParser):
    """The `href` and `src` URLs of a page, and the OpenAPI document its Swagger UI loads."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.openapi_url: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.urls += [url for name in ("href", "src") if (url := attributes.get(name))]
        self.openapi_url = attributes.get("data-openapi-url") or self.openapi_url


_SHOWN = {
    "opblock-summary-method": "method",
    "opblock-summary-operation-id": "operation_id",
    "opblock-summary-description": "summary",
}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _RenderedOperations(HTMLParser):
    """The operations of a DOM that Swagger UI rendered: of each operation block, what its summary
    line shows (method, path, operationId, summary)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[dict[str, str]] = []
        self._field: str | None = None
        self._depth = 0

    @property
    def operations(self) -> list[Operation]:
        def shown(block: dict[str, str], field: str) -> str:
            return block.get(field, "").strip()

        return [
            (shown(b, "method"), shown(b, "path"), shown(b, "operation_id"), shown(b, "summary"))
            for b in self.blocks
        ]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        if self._field is not None:
            self._depth += 1
            return
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "div" and "opblock" in classes:
            self.blocks.append({})
        elif self.blocks and "opblock-summary-path" in classes:
            self.blocks[-1]["path"] = attributes.get("data-path") or ""
        elif self.blocks and (shown := next((_SHOWN[c] for c in classes if c in _SHOWN), None)):
            self._field, self._depth = shown, 1
            self.blocks[-1][shown] = ""

    def handle_endtag(self, tag: str) -> None:
        if self._field is not None and tag not in _VOID:
            self._depth -= 1
            if self._depth == 0:
                self._field = None

    def handle_data(self, data: str) -> None:
        if self._field is not None:
            self.blocks[-1][self._field] += data


def _documented() -> list[Operation]:
    return sorted(
        (method.upper(), path, operation["operationId"], operation["summary"])
        for path, operations in SPEC["paths"].items()
        for method, operation in operations.items()
    )


async def _get(stack: LiveStack, path: str, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
    async with stack.http.get(stack.base + path, headers=headers) as response:
        return response, await response.read()


async def test_docs_is_public_html_and_its_assets_are_served_with_their_types(stack: LiveStack) -> None:
    response, page = await _get(stack, "/docs")  # no key
    assert response.status == 200, page
    assert (response.content_type, response.charset) == ("text/html", "utf-8")
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["Cache-Control"] == "no-cache"
    slashed, same_page = await _get(stack, "/docs/")
    assert (slashed.status, slashed.content_type, same_page) == (200, "text/html", page)
    assert slashed.headers["ETag"] == response.headers["ETag"]
    unchanged, _ = await _get(stack, "/docs", **{"If-None-Match": response.headers["ETag"]})
    assert unchanged.status == 304

    links = _Links()
    links.feed(page.decode())
    assert links.openapi_url == "/openapi.json"
    spec, _ = await _get(stack, links.openapi_url)
    assert (spec.status, spec.content_type) == (200, "application/json")
    assets = [url for url in links.urls if url.startswith("/docs/assets/")]
    assert sorted(Path(url).suffix for url in assets) == [".css", ".css", ".js", ".js", ".png"]
    assert all(url.startswith("/") for url in links.urls), "the page fetches nothing from elsewhere"
    for url in assets:
        kind = TYPES[Path(url).suffix]
        plain, body = await _get(stack, url, **{"Accept-Encoding": "identity"})
        assert (plain.status, plain.content_type) == (200, kind), url
        assert plain.headers["Cache-Control"] == IMMUTABLE
        assert "Content-Encoding" not in plain.headers and body
        if kind.startswith("text/"):
            assert plain.charset == "utf-8"
            # aiohttp's client accepts gzip and deflate and inflates them: the same bytes, fewer on the wire.
            zipped, inflated = await _get(stack, url)
            assert zipped.headers["Content-Encoding"] in ("gzip", "deflate") and inflated == body, url

    # Only the current digest is served: a URL never changes content under a year's caching.
    digest = assets[0].split("/")[3]
    for gone in (assets[0].replace(digest, "0" * len(digest)), f"/docs/assets/{digest}/index.html"):
        response, problem = await stack.call("GET", gone)
        assert_problem(response, problem, 404, "not_found")


def _browser() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    pytest.skip(f"no {', '.join(BROWSERS)} on PATH (apt-get install chromium): /docs rendering untested")


async def _run_browser(*args: str) -> tuple[str, str]:
    """Runs Chromium headless (stdout, stderr), killed if it outlives BROWSER_TIMEOUT_S. Not
    subprocess.run: the gateway serving it runs on this very event loop."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BROWSER_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"Chromium did not finish within {BROWSER_TIMEOUT_S:g} s")
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(), err.decode(errors="replace")


async def test_the_browser_renders_every_operation_of_the_openapi_document(
    stack: LiveStack, tmp_path: Path
) -> None:
    browser = _browser()
    dom, log = await _run_browser(
        browser,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={tmp_path / 'chromium'}",
        # The page's console on stderr: a Content-Security-Policy violation shows there.
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        # Virtual time waits for the scripts and for the document's fetch, then the DOM is dumped.
        "--virtual-time-budget=10000",
        f"{stack.base}/docs",
    )
    rendered = _RenderedOperations()
    rendered.feed(dom)
    assert sorted(rendered.operations) == _documented(), dom[-2000:]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Content Security Policy" in line], console
