"""The playground: one small page at ``/{app}/playground`` for trying the model from a browser.

The page is ``static/playground.html`` with ``playground.css`` and ``playground.js`` beside it: no external
resources (the service runs offline), no build step. It calls the seed API at ``/{app}/v1/...`` with URLs built
from the app name injected here into ``<html data-app=...>`` (never relative paths), and it works when an API token
is set (a field in the page; the edge middleware keeps every path containing ``/playground`` open, the API itself
is not).

A strict Content-Security-Policy limits the page to same-origin scripts, styles and requests; the script writes
model output with ``textContent`` only.

``service.py`` mounts this app at ``/{app}/playground``. A starlette ``Mount`` only matches ``/{app}/playground/``
and below; the bare ``/{app}/playground`` gets the router's trailing-slash redirect (307 to ``.../playground/``),
so both addresses open the page. Asset URLs are absolute for the same reason.
"""

from __future__ import annotations

import html
from importlib import resources
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_static(name: str) -> str:
    """A file of ``medgemma/static`` (package data)."""
    return resources.files("medgemma").joinpath("static", name).read_text(encoding="utf-8")


def render_page(app_name: str, root_path: str = "") -> str:
    """The page with the app name, the server's root path and the asset base filled in (HTML-escaped)."""
    root = root_path.rstrip("/")
    values = {
        "APP_NAME": app_name,
        "ROOT_PATH": root,
        "ASSET_BASE": f"{root}/{quote(app_name, safe='')}/playground",
    }
    page = read_static("playground.html")
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(value, quote=True))
    return page


def playground_app(app_name: str) -> Starlette:
    """The ASGI app mounted at ``/{app_name}/playground``: ``GET /`` is the page, plus its CSS and JS."""
    assets = {name: read_static(name).encode() for name in ASSETS}  # fail at startup, not on first view
    read_static("playground.html")

    async def page(request: Request) -> Response:
        # app_root_path: a `--root-path` the server runs under (empty by default), so API URLs stay right.
        root = request.scope.get("app_root_path", "")
        return Response(
            render_page(app_name, root),
            media_type="text/html; charset=utf-8",
            headers={**_HEADERS, "Cache-Control": "no-store"},
        )

    def asset(name: str) -> Route:
        async def serve(_request: Request) -> Response:
            return Response(assets[name], media_type=ASSETS[name], headers=_HEADERS)

        return Route(f"/{name}", serve)

    return Starlette(routes=[Route("/", page), *(asset(name) for name in ASSETS)])
