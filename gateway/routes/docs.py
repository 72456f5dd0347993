"""`GET /docs`: the OpenAPI document (`/openapi.json`) rendered for people, public like the document.

Swagger UI rather than ReDoc: it renders OpenAPI 3.1 (from 5.0), its "Try it out" calls the API with a
key given in its Authorize dialog, and it runs under a strict Content-Security-Policy (ReDoc injects
`<style>` elements, which would need `style-src 'unsafe-inline'`). Its files come from the
`swagger-ui-bundle-v2` distribution (the original `swagger-ui-bundle` stops at Swagger UI 4, which
refuses a 3.1 document): nothing is fetched from elsewhere, at build or at run time.

The files are read and hashed once, on the first request (off the event loop), and served under
`/docs/assets/<digest>/<name>`, compressed as the client accepts (aiohttp's): a URL never changes
content, so browsers may keep it a year, and the page itself, whose ETag is that digest, is
revalidated on every visit.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
from dataclasses import dataclass
from importlib.resources.abc import Traversable

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from gateway.openapi import SPEC
from gateway.routes.output import etag_matches
from shared.errors import NotFound

routes = web.RouteTableDef()

PAGE = "/docs"
ASSETS = f"{PAGE}/assets"
OPENAPI_URL = "/openapi.json"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # Swagger UI's stylesheet draws its icons from data: URLs
        "connect-src 'self'",  # the document, and "Try it out"
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",  # no framing page may steer "Try it out" with a key in it
    ]
)
IMMUTABLE = "public, max-age=31536000, immutable"
_TEXT = "; charset=utf-8"
_DIST: Traversable = swagger_ui_path

_START = """\
"use strict";
// Renders the OpenAPI document named by the container's data-openapi-url (a file of its own, as the
// page's Content-Security-Policy allows no inline script).
(() => {
  const container = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: container.dataset.openapiUrl,
    domNode: container,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis],
    deepLinking: true,
    displayOperationId: true,
    validatorUrl: null,
  });
})();
"""
_JS = "text/javascript" + _TEXT
_SWAGGER_UI_FILES = {
    "swagger-ui.css": "text/css" + _TEXT,
    "index.css": "text/css" + _TEXT,
    "swagger-ui-bundle.js": _JS,
    "favicon-32x32.png": "image/png",
}


@dataclass(frozen=True)
class Asset:
    """One file the page loads."""

    body: bytes
    content_type: str


@dataclass(frozen=True)
class Bundle:
    """The page and its assets, built once."""

    digest: str
    page: bytes
    assets: dict[str, Asset]


def _page(digest: str) -> bytes:
    def asset(name: str) -> str:
        return f"{ASSETS}/{digest}/{name}"

    title = html.escape(f"{SPEC['info']['title']} API")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{asset("swagger-ui.css")}">
<link rel="stylesheet" href="{asset("index.css")}">
<link rel="icon" type="image/png" sizes="32x32" href="{asset("favicon-32x32.png")}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{OPENAPI_URL}"></div>
<script src="{asset("swagger-ui-bundle.js")}"></script>
<script src="{asset("start.js")}"></script>
</body>
</html>
""".encode()


def build() -> Bundle:
    """Reads and hashes the assets, and writes the page that names them (blocking)."""
    files = {name: (_DIST.joinpath(name).read_bytes(), kind) for name, kind in _SWAGGER_UI_FILES.items()}
    files["start.js"] = (_START.encode(), _JS)
    hashed = hashlib.sha256()
    for name, (body, _) in files.items():
        hashed.update(f"{name}\0{len(body)}\0".encode() + body)
    digest = hashed.hexdigest()[:16]
    assets = {name: Asset(body, kind) for name, (body, kind) in files.items()}
    return Bundle(digest, _page(digest), assets)


class _Built:
    """The bundle, built on first use in a worker thread: the gateway starts no slower for it."""

    def __init__(self) -> None:
        self._bundle: Bundle | None = None

    async def get(self) -> Bundle:
        if self._bundle is None:
            # Two first requests at once may both build it: the same bytes, so no lock is needed.
            self._bundle = await asyncio.to_thread(build)
        return self._bundle


_BUILT = _Built()


async def docs_page(request: web.Request) -> web.Response:
    bundle = await _BUILT.get()
    headers = {
        "Cache-Control": "no-cache",
        "ETag": f'"{bundle.digest}"',
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    if etag_matches(request.headers.get("If-None-Match"), headers["ETag"]):
        return web.Response(status=304, headers=headers)
    response = web.Response(body=bundle.page, headers=headers)
    response.headers["Content-Type"] = "text/html" + _TEXT
    return response


# The same page with or without the slash: its links are absolute, so either works.
routes.get(PAGE)(docs_page)
routes.get(f"{PAGE}/")(docs_page)


@routes.get(f"{ASSETS}/{{digest}}/{{name}}")
async def docs_asset(request: web.Request) -> web.Response:
    bundle = await _BUILT.get()
    asset = bundle.assets.get(request.match_info["name"])
    if asset is None or request.match_info["digest"] != bundle.digest:
        raise NotFound("No such asset of the documentation page.")
    headers = {"Cache-Control": IMMUTABLE, "X-Content-Type-Options": "nosniff"}
    response = web.Response(body=asset.body, headers=headers)
    response.headers["Content-Type"] = asset.content_type
    if asset.content_type.startswith("text/"):  # images are compressed already
        response.enable_compression()
    return response
